"""Qwen2.5-VL adapter on a tiny random-weight model: pruning off is exact, pruning on equals the unpatched
model run on independently pruned inputs, generate agrees with forward, both modes run, errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    qwen_expected_pruned,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_qwen2_5_vl,
)
from medpruner import MedPrunerConfig, apply_medpruner, remove_medpruner  # noqa: E402

BACKEND = "torch"


def _window_order(visual, grid):
    from transformers.vision_utils import get_vision_window_index

    order, _ = get_vision_window_index(
        grid,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
        kwargs={},
    )
    return order


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_5_vl()


@pytest.fixture(scope="module")
def processor():
    return qwen_processor("qwen2_5_vl", clip_norm=True)


@pytest.fixture(autouse=True)
def _unpatched(model):
    remove_medpruner(model)
    yield
    remove_medpruner(model)


def _single(processor):
    return qwen_volume_inputs(processor, [synthetic_volume(5, seed=3)])


def _batch(processor):
    return qwen_volume_inputs(processor, [synthetic_volume(6, seed=1), synthetic_volume(3, seed=2)])


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------------------------- tests
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
    call, valid = qwen_expected_pruned(
        model,
        inputs,
        gamma=gamma,
        tau=tau,
        merge=merge,
        mode=mode,
        temperature=1.0,
        window_order=_window_order,
    )
    with torch.no_grad():
        expected = model(**call).logits
    apply_medpruner(model, gamma=gamma, tau=tau, merge=merge, mode=mode, backend=BACKEND)
    got = _logits(model, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
    stats = model.medpruner_stats
    assert stats.tokens_after < stats.tokens_before
    assert sum(stats.slices_kept) < sum(stats.slices_total)
    for per_volume, kept in zip(stats.tokens_per_slice, stats.slices_kept, strict=True):
        assert sum(1 for n in per_volume if n >= 2) <= kept
        assert min(per_volume) >= (1 if mode == "paper" else 0)


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


def test_generate_pruning_off_matches_unpatched_generate(model, processor):
    inputs = _batch(processor)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    apply_medpruner(model, gamma=-1.0, tau=1.0, merge=False, backend=BACKEND)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_generate_max_length_counts_unpruned_prompt(model, processor):
    inputs = _single(processor)
    apply_medpruner(model, gamma=0.05, tau=0.5, backend=BACKEND)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_length=prompt_length + 3, do_sample=False)
    assert generated.shape[1] <= prompt_length + 3


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
    assert "slices" in fast.summary()


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


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": 1.5}, "tau"),
        ({"mode": "slow"}, "mode"),
        ({"temperature": -1.0}, "temperature"),
        ({"context_frac": 2.0}, "context_frac"),
        ({"backend": "cuda"}, "backend"),
        ({"min_keep": 0}, "min_keep"),
        ({"importance_layer": 7}, "importance_layer"),
        ({"gamma": float("nan")}, "gamma"),
    ],
)
def test_bad_config_raises_naming_the_field(model, kwargs, field):
    with pytest.raises(ValueError, match=field):
        apply_medpruner(model, **kwargs)
    assert not hasattr(model, "medpruner_stats")


def test_unsupported_model_raises_type_error():
    with pytest.raises(TypeError, match="Linear"):
        apply_medpruner(torch.nn.Linear(2, 2))


def test_config_json_round_trip_and_unknown_field():
    config = MedPrunerConfig(gamma=0.1, tau=0.8, mode="paper", temperature=1.5)
    assert MedPrunerConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="bogus"):
        MedPrunerConfig.from_dict({"bogus": 1})
    with pytest.raises(TypeError, match="merge"):
        MedPrunerConfig(merge="yes")


def test_mismatched_grid_raises(model, processor):
    inputs = dict(_single(processor))
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:-1]
    apply_medpruner(model, backend=BACKEND)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**inputs)
