"""Gemma3 / MedGemma adapter on a tiny random-weight model: pruning off is exact, pruning on equals the
unpatched model run on independently pruned inputs, generate agrees with forward, both modes run, errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_expected_pruned,
    gemma_processor,
    gemma_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
)
from medpruner import apply_medpruner, remove_medpruner  # noqa: E402

BACKEND = "torch"


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def processor():
    return gemma_processor()


@pytest.fixture(autouse=True)
def _unpatched(model):
    remove_medpruner(model)
    yield
    remove_medpruner(model)


def _single(processor):
    return gemma_volume_inputs(processor, [synthetic_volume(5, seed=3)])


def _batch(processor):
    return gemma_volume_inputs(processor, [synthetic_volume(6, seed=1), synthetic_volume(3, seed=2)])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("mode", ["fast", "paper"])
@pytest.mark.parametrize("inputs_name", ["single", "batch"])
def test_pruning_off_matches_unpatched(model, processor, mode, inputs_name):
    inputs = _single(processor) if inputs_name == "single" else _batch(processor)
    expected = _logits(model, inputs)
    apply_medpruner(model, gamma=-1.0, tau=1.0, merge=False, mode=mode, backend=BACKEND)
    got = _logits(model, inputs)
    valid = inputs["attention_mask"].bool()
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    stats = model.medpruner_stats
    assert stats.retention == 1.0 and stats.slices_kept == stats.slices_total


@pytest.mark.parametrize("mode", ["fast", "paper"])
@pytest.mark.parametrize("merge", [False, True])
def test_pruning_on_matches_explicitly_pruned_inputs(model, processor, mode, merge):
    inputs = _batch(processor)
    gamma, tau = 0.05, 0.6
    call, valid = gemma_expected_pruned(model, inputs, gamma=gamma, tau=tau, merge=merge, mode=mode)
    with torch.no_grad():
        expected = model(**call).logits
    apply_medpruner(model, gamma=gamma, tau=tau, merge=merge, mode=mode, backend=BACKEND)
    got = _logits(model, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
    stats = model.medpruner_stats
    assert stats.tokens_after < stats.tokens_before
    assert sum(stats.slices_kept) < sum(stats.slices_total)
    per_image = model.config.mm_tokens_per_image
    for per_volume, total in zip(stats.tokens_per_slice, stats.slices_total, strict=True):
        assert len(per_volume) == total
        assert max(per_volume) <= per_image
        assert min(per_volume) >= (1 if mode == "paper" else 0)


def test_pruning_keeps_image_blocks_bidirectional(model, processor):
    """token_type_ids are repacked with the tokens: every kept image token is still marked as image, so
    the block-bidirectional mask covers exactly the kept tokens of each slice."""
    inputs = _batch(processor)
    call, _ = gemma_expected_pruned(model, inputs, gamma=0.05, tau=0.6, merge=True, mode="fast")
    image_token = model.config.image_token_id
    assert torch.equal(call["token_type_ids"] == 1, call["input_ids"] == image_token)
    apply_medpruner(model, gamma=0.05, tau=0.6, mode="fast", backend=BACKEND)
    got = _logits(model, inputs)
    with torch.no_grad():
        without_types = model(**{k: v for k, v in call.items() if k != "token_type_ids"})
    # Dropping the block structure changes the result, so the repacked types are what the test above checks.
    assert not torch.allclose(got[:, -1], without_types.logits[:, -1])


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_generate_first_token_matches_forward(model, processor, mode):
    inputs = _batch(processor)
    apply_medpruner(model, gamma=0.05, tau=0.6, mode=mode, backend=BACKEND)
    logits = _logits(model, inputs)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (2, prompt_length + 4)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(generated[:, prompt_length], logits[:, -1].argmax(-1))


def test_generate_matches_unpatched_generate_on_pruned_inputs(model, processor):
    inputs = _batch(processor)
    call, _ = gemma_expected_pruned(model, inputs, gamma=0.05, tau=0.6, merge=True, mode="fast")
    with torch.no_grad():
        expected = model.generate(**call, max_new_tokens=5, do_sample=False)
    apply_medpruner(model, gamma=0.05, tau=0.6, mode="fast", backend=BACKEND)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = expected[:, call["input_ids"].shape[1] :]
    assert torch.equal(got[:, inputs["input_ids"].shape[1] :], new_tokens)


def test_generate_pruning_off_matches_unpatched_generate(model, processor):
    inputs = _batch(processor)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    apply_medpruner(model, gamma=-1.0, tau=1.0, merge=False, backend=BACKEND)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_fast_mode_encodes_fewer_slices_than_paper(model, processor):
    inputs = _batch(processor)
    apply_medpruner(model, mode="paper", backend=BACKEND)
    _logits(model, inputs)
    paper = model.medpruner_stats
    apply_medpruner(model, mode="fast", backend=BACKEND)
    _logits(model, inputs)
    fast = model.medpruner_stats
    assert paper.slices_encoded == sum(paper.slices_total) == 9
    assert fast.slices_encoded == sum(fast.slices_kept) < paper.slices_encoded
    assert fast.slices_kept == paper.slices_kept


def test_remove_restores_unpatched_behaviour(model, processor):
    inputs = _single(processor)
    expected = _logits(model, inputs)
    apply_medpruner(model, tau=0.5, backend=BACKEND)
    assert _logits(model, inputs).shape[1] < expected.shape[1]
    remove_medpruner(model)
    assert not hasattr(model, "medpruner_stats")
    torch.testing.assert_close(_logits(model, inputs), expected)


def test_text_only_requests_pass_through(model, processor):
    apply_medpruner(model, backend=BACKEND)
    ids = processor.tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).logits
    assert out.shape[:2] == ids["input_ids"].shape
    assert model.medpruner_stats is None


def test_default_temperature_is_two(model):
    from medpruner.adapters import adapter_for

    assert adapter_for(model).default_temperature == 2.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tau": 0.0}, "tau"),
        ({"importance_layer": 2}, "importance_layer"),
        ({"importance_layer": -3}, "importance_layer"),
    ],
)
def test_bad_config_raises_naming_the_field(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        apply_medpruner(model, **kwargs)
    assert not hasattr(model, "medpruner_stats")


def test_unsupported_model_raises_naming_the_class():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    text_model = Gemma3ForCausalLM(
        Gemma3TextConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    with pytest.raises(TypeError, match="Gemma3ForCausalLM"):
        apply_medpruner(text_model)


def test_placeholder_mismatch_raises(model, processor):
    inputs = dict(_single(processor))
    inputs["pixel_values"] = inputs["pixel_values"][:-1]
    apply_medpruner(model, backend=BACKEND)
    with pytest.raises(ValueError, match="pixel_values"):
        model(**inputs)
