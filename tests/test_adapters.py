"""Every adapter family on a tiny random-weight model: pruning off is exact, pruning on equals the unpatched
model run on independently pruned inputs, generate agrees with forward, both modes run, errors. Behaviour
that only one family has is tested for that family only (see ``for_families``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_expected_pruned,
    gemma_processor,
    gemma_volume_inputs,
    qwen_expected_pruned,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from medpruner import apply_medpruner, remove_medpruner  # noqa: E402
from medpruner.adapters import adapter_for  # noqa: E402

BACKEND = "torch"


# ------------------------------------------------------------------------------ per-family hooks
def _qwen2_5_window_order(visual, grid):
    from transformers.vision_utils import get_vision_window_index

    order, _ = get_vision_window_index(
        grid,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
        kwargs={},
    )
    return order


def _gemma3_text_only_model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(
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


def _at_most_kept_slices_have_two_tokens(model, stats):
    for per_volume, kept in zip(stats.tokens_per_slice, stats.slices_kept, strict=True):
        assert sum(1 for n in per_volume if n >= 2) <= kept


def _every_slice_within_its_image_tokens(model, stats):
    per_image = model.config.mm_tokens_per_image
    for per_volume, total in zip(stats.tokens_per_slice, stats.slices_total, strict=True):
        assert len(per_volume) == total
        assert max(per_volume) <= per_image


QWEN_BAD_CONFIGS = [
    ({"tau": 0.0}, "tau"),
    ({"tau": float("inf")}, "tau"),
    ({"mode": "slow"}, "mode"),
    ({"temperature": -1.0}, "temperature"),
    ({"context_frac": 2.0}, "context_frac"),
    ({"backend": "cuda"}, "backend"),
    ({"min_keep": 0}, "min_keep"),
    ({"importance_layer": 7}, "importance_layer"),
    ({"gamma": float("nan")}, "gamma"),
]


@dataclass(frozen=True)
class FamilySpec:
    """How the shared tests build one family's tiny model and inputs and what they expect of it."""

    build_model: Callable[[], torch.nn.Module]
    build_processor: Callable[[], object]
    volume_inputs: Callable  # (processor, volumes) -> processor inputs, one row per volume
    expected_pruned: Callable  # independent oracle: (model, inputs, **pruning) -> (call, valid mask)
    default_temperature: float  # the adapter's default T, which the oracle prunes with too
    check_tokens_per_slice: Callable  # (model, stats) -> None, asserts the family's per-slice bounds
    bad_configs: list[tuple[dict, str]]
    # The input whose last image is dropped so the placeholders no longer match, and the error names it.
    mismatch_input: str
    unsupported_model: Callable[[], torch.nn.Module]
    unsupported_class_name: str


QWEN_UNSUPPORTED = dict(unsupported_model=lambda: torch.nn.Linear(2, 2), unsupported_class_name="Linear")

FAMILY_SPECS = {
    "qwen3_vl": FamilySpec(
        build_model=tiny_qwen3_vl,
        build_processor=functools.partial(qwen_processor, "qwen3_vl"),
        volume_inputs=qwen_volume_inputs,
        expected_pruned=qwen_expected_pruned,
        default_temperature=2.0,
        check_tokens_per_slice=_at_most_kept_slices_have_two_tokens,
        bad_configs=QWEN_BAD_CONFIGS,
        mismatch_input="image_grid_thw",
        **QWEN_UNSUPPORTED,
    ),
    "qwen2_5_vl": FamilySpec(
        build_model=tiny_qwen2_5_vl,
        build_processor=functools.partial(qwen_processor, "qwen2_5_vl", clip_norm=True),
        volume_inputs=qwen_volume_inputs,
        # the vision tower attends in window order; the oracle maps its scores back to patch order
        expected_pruned=functools.partial(qwen_expected_pruned, window_order=_qwen2_5_window_order),
        default_temperature=1.0,
        check_tokens_per_slice=_at_most_kept_slices_have_two_tokens,
        bad_configs=QWEN_BAD_CONFIGS,
        mismatch_input="image_grid_thw",
        **QWEN_UNSUPPORTED,
    ),
    "gemma3": FamilySpec(
        build_model=tiny_gemma3,
        build_processor=gemma_processor,
        volume_inputs=gemma_volume_inputs,
        expected_pruned=gemma_expected_pruned,
        default_temperature=2.0,
        check_tokens_per_slice=_every_slice_within_its_image_tokens,
        bad_configs=[
            ({"tau": 0.0}, "tau"),
            ({"importance_layer": 2}, "importance_layer"),
            ({"importance_layer": -3}, "importance_layer"),
        ],
        mismatch_input="pixel_values",
        unsupported_model=_gemma3_text_only_model,
        unsupported_class_name="Gemma3ForCausalLM",
    ),
}
QWEN_FAMILIES = ("qwen3_vl", "qwen2_5_vl")


@dataclass(frozen=True)
class TinyFamily:
    spec: FamilySpec
    model: torch.nn.Module
    processor: object

    def single_volume_inputs(self):
        return self.spec.volume_inputs(self.processor, [synthetic_volume(5, seed=3)])

    def two_volume_inputs(self):
        return self.spec.volume_inputs(self.processor, [synthetic_volume(6, seed=1), synthetic_volume(3, seed=2)])

    def expected_pruned(self, inputs, **pruning):
        return self.spec.expected_pruned(self.model, inputs, temperature=self.spec.default_temperature, **pruning)


@pytest.fixture(scope="module", params=list(FAMILY_SPECS))
def tiny_family(request):
    spec = FAMILY_SPECS[request.param]
    return TinyFamily(spec, spec.build_model(), spec.build_processor())


@pytest.fixture
def family(tiny_family):
    """The module's tiny family, unpatched before and after the test."""
    remove_medpruner(tiny_family.model)
    yield tiny_family
    remove_medpruner(tiny_family.model)


def for_families(*names):
    return pytest.mark.parametrize("tiny_family", names, indirect=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------ shared tests
@pytest.mark.parametrize("mode", ["fast", "paper"])
@pytest.mark.parametrize("inputs_name", ["single", "batch"])
def test_pruning_off_matches_unpatched(family, mode, inputs_name):
    model = family.model
    inputs = family.single_volume_inputs() if inputs_name == "single" else family.two_volume_inputs()
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
def test_pruning_on_matches_explicitly_pruned_inputs(family, mode, merge):
    model = family.model
    inputs = family.two_volume_inputs()
    gamma, tau = 0.05, 0.6
    call, valid = family.expected_pruned(inputs, gamma=gamma, tau=tau, merge=merge, mode=mode)
    with torch.no_grad():
        expected = model(**call).logits
    apply_medpruner(model, gamma=gamma, tau=tau, merge=merge, mode=mode, backend=BACKEND)
    got = _logits(model, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)
    stats = model.medpruner_stats
    assert stats.tokens_after < stats.tokens_before
    assert sum(stats.slices_kept) < sum(stats.slices_total)
    family.spec.check_tokens_per_slice(model, stats)
    for per_volume in stats.tokens_per_slice:
        assert min(per_volume) >= (1 if mode == "paper" else 0)


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_generate_first_token_matches_forward(family, mode):
    model = family.model
    inputs = family.two_volume_inputs()
    apply_medpruner(model, gamma=0.05, tau=0.6, mode=mode, backend=BACKEND)
    logits = _logits(model, inputs)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert generated.shape == (2, prompt_length + 4)
    assert torch.equal(generated[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(generated[:, prompt_length], logits[:, -1].argmax(-1))


def test_generate_pruning_off_matches_unpatched_generate(family):
    model = family.model
    inputs = family.two_volume_inputs()
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    apply_medpruner(model, gamma=-1.0, tau=1.0, merge=False, backend=BACKEND)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_fast_mode_encodes_fewer_slices_than_paper(family):
    model = family.model
    inputs = family.two_volume_inputs()
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


def test_remove_restores_unpatched_behaviour(family):
    model = family.model
    inputs = family.single_volume_inputs()
    expected = _logits(model, inputs)
    apply_medpruner(model, tau=0.5, backend=BACKEND)
    assert _logits(model, inputs).shape[1] < expected.shape[1]
    remove_medpruner(model)
    assert not hasattr(model, "medpruner_stats")
    torch.testing.assert_close(_logits(model, inputs), expected)


def test_text_only_requests_pass_through(family):
    model = family.model
    apply_medpruner(model, backend=BACKEND)
    ids = family.processor.tokenizer(["hello there"], return_tensors="pt")
    with torch.no_grad():
        out = model(**ids).logits
    assert out.shape[:2] == ids["input_ids"].shape
    assert model.medpruner_stats is None


def test_default_temperature(family):
    assert adapter_for(family.model).default_temperature == family.spec.default_temperature


def _bad_config_id(value):
    if isinstance(value, str):
        return value
    kwargs, _ = value
    return ",".join(f"{name}={setting}" for name, setting in kwargs.items())


@pytest.mark.parametrize(
    "tiny_family, bad_config",
    [(name, bad_config) for name, spec in FAMILY_SPECS.items() for bad_config in spec.bad_configs],
    indirect=["tiny_family"],
    ids=_bad_config_id,
    # With a direct argument pytest would scope the family parameter per function and rebuild it per case.
    scope="module",
)
def test_bad_config_raises_naming_the_field(family, bad_config):
    kwargs, field = bad_config
    with pytest.raises(ValueError, match=field):
        apply_medpruner(family.model, **kwargs)
    assert not hasattr(family.model, "medpruner_stats")


def test_unsupported_model_raises_type_error_naming_the_class(family):
    with pytest.raises(TypeError, match=family.spec.unsupported_class_name):
        apply_medpruner(family.spec.unsupported_model())


def test_placeholder_mismatch_raises_naming_the_input(family):
    inputs = dict(family.single_volume_inputs())
    key = family.spec.mismatch_input
    inputs[key] = inputs[key][:-1]
    apply_medpruner(family.model, backend=BACKEND)
    with pytest.raises(ValueError, match=key):
        family.model(**inputs)


# ------------------------------------------------------------------------------ family-specific tests
@for_families(*QWEN_FAMILIES)
def test_generate_max_length_counts_unpruned_prompt(family):
    model = family.model
    inputs = family.single_volume_inputs()
    apply_medpruner(model, gamma=0.05, tau=0.5, backend=BACKEND)
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        generated = model.generate(**inputs, max_length=prompt_length + 3, do_sample=False)
    assert generated.shape[1] <= prompt_length + 3


@for_families("gemma3")
def test_pruning_keeps_image_blocks_bidirectional(family):
    """token_type_ids are repacked with the tokens: every kept image token is still marked as image, so
    the block-bidirectional mask covers exactly the kept tokens of each slice."""
    model = family.model
    inputs = family.two_volume_inputs()
    call, _ = family.expected_pruned(inputs, gamma=0.05, tau=0.6, merge=True, mode="fast")
    image_token = model.config.image_token_id
    assert torch.equal(call["token_type_ids"] == 1, call["input_ids"] == image_token)
    apply_medpruner(model, gamma=0.05, tau=0.6, mode="fast", backend=BACKEND)
    got = _logits(model, inputs)
    with torch.no_grad():
        without_types = model(**{k: v for k, v in call.items() if k != "token_type_ids"})
    # Dropping the block structure changes the result, so the repacked types are what the test above checks.
    assert not torch.allclose(got[:, -1], without_types.logits[:, -1])


@for_families("gemma3")
def test_generate_matches_unpatched_generate_on_pruned_inputs(family):
    model = family.model
    inputs = family.two_volume_inputs()
    call, _ = family.expected_pruned(inputs, gamma=0.05, tau=0.6, merge=True, mode="fast")
    with torch.no_grad():
        expected = model.generate(**call, max_new_tokens=5, do_sample=False)
    apply_medpruner(model, gamma=0.05, tau=0.6, mode="fast", backend=BACKEND)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = expected[:, call["input_ids"].shape[1] :]
    assert torch.equal(got[:, inputs["input_ids"].shape[1] :], new_tokens)


# ------------------------------------------------------------------------------ every kernel backend
try:
    from conftest import available_backends  # noqa: E402

    KERNEL_BACKENDS = available_backends(
        cpp_ops=("iaf_select", "nucleus_select_cpu", "attention_importance", "merge_tokens")
    )
except ImportError:  # pragma: no cover - conftest is always importable under pytest
    KERNEL_BACKENDS = ["torch"]


# The Triton interpreter is slow: it runs one mode on one volume (paper mode adds no kernel of its own).
BACKEND_CASES = [(backend, mode) for backend in KERNEL_BACKENDS if backend != BACKEND for mode in ("fast", "paper")]
BACKEND_CASES = [(backend, mode) for backend, mode in BACKEND_CASES if backend != "triton" or mode == "fast"]


@pytest.mark.parametrize("backend, mode", BACKEND_CASES)
def test_every_backend_matches_explicitly_pruned_inputs(family, backend, mode):
    """The kernels a GPU user gets (triton, here under the interpreter) and the C++ ones, inside each model."""
    model = family.model
    inputs = family.single_volume_inputs() if backend == "triton" else family.two_volume_inputs()
    call, valid = family.expected_pruned(inputs, gamma=0.05, tau=0.6, merge=True, mode=mode)
    with torch.no_grad():
        expected = model(**call).logits
    apply_medpruner(model, gamma=0.05, tau=0.6, merge=True, mode=mode, backend=backend)
    got = _logits(model, inputs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ correctness gaps
@for_families(*QWEN_FAMILIES)
@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_qwen_generate_matches_greedy_explicit_forwards(family, mode):
    """8 new tokens of the patched generate equal greedy decoding by explicit full forwards (no cache) on
    the independently pruned inputs, each new token at the M-RoPE position the unpruned sequence would
    give it: so rope_deltas carry the unpruned numbering through decoding."""
    model = family.model
    inputs = family.two_volume_inputs()
    steps = 8
    call, _ = family.expected_pruned(inputs, gamma=0.05, tau=0.6, merge=True, mode=mode)
    with torch.no_grad():
        unpruned_positions, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
    valid = inputs["attention_mask"].bool()
    next_position = torch.stack([unpruned_positions[:, b][:, valid[b]].max() + 1 for b in range(valid.shape[0])])
    next_text = call["attention_mask"].sum(1)
    ids, mask, types, positions = (
        call["input_ids"],
        call["attention_mask"],
        call["mm_token_type_ids"],
        call["position_ids"],
    )
    expected = []
    for step in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                mm_token_type_ids=types,
                position_ids=positions,
                mm_encoder_outputs=call["mm_encoder_outputs"],
                use_cache=False,
            ).logits
        # a random model may emit an image placeholder, which would ask for features: forbidden in both
        token = logits[:, -1].index_fill(-1, torch.tensor([model.config.image_token_id]), float("-inf")).argmax(-1)
        expected.append(token)
        column = torch.stack([next_text + step] + [next_position + step] * 3).unsqueeze(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
        positions = torch.cat([positions, column], dim=2)
    expected = torch.stack(expected, dim=1)
    apply_medpruner(model, gamma=0.05, tau=0.6, merge=True, mode=mode, backend=BACKEND)
    with torch.no_grad():
        generated = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            bad_words_ids=[[model.config.image_token_id]],
        )
    got = generated[:, inputs["input_ids"].shape[1] :]
    assert got.shape == (2, steps)
    assert torch.equal(got, expected)


def _text_labels(input_ids, attention_mask, image_token):
    """Labels on the text tokens; the first token of a row is predicted from padding, so it is ignored."""
    first = (attention_mask.cumsum(1) == 1) & attention_mask.bool()
    ignored = (input_ids == image_token) | (attention_mask == 0) | first
    return input_ids.masked_fill(ignored, -100)


def test_labels_are_pruned_with_the_sequence(family):
    model = family.model
    inputs = family.two_volume_inputs()
    image_token = model.config.image_token_id
    labels = _text_labels(inputs["input_ids"], inputs["attention_mask"], image_token)
    call, _ = family.expected_pruned(inputs, gamma=0.05, tau=0.6, merge=True, mode="fast")
    pruned_labels = _text_labels(call["input_ids"], call["attention_mask"], image_token)
    with torch.no_grad():
        expected = model(**call, labels=pruned_labels).loss
    apply_medpruner(model, gamma=0.05, tau=0.6, merge=True, mode="fast", backend=BACKEND)
    with torch.no_grad():
        got = model(**inputs, labels=labels).loss
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=labels[:, 1:])


def test_remove_restores_an_instance_forward_hook(family):
    """A model loaded with device_map carries accelerate's hook as an instance ``forward`` (a wrapper with
    the original's signature); patching wraps it and removing puts that exact object back."""
    model = family.model
    inputs = family.single_volume_inputs()
    calls = []
    class_forward = type(model).forward

    @functools.wraps(class_forward)
    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return class_forward(model, *args, **kwargs)

    model.forward = hooked_forward
    try:
        apply_medpruner(model, tau=0.5, backend=BACKEND)
        apply_medpruner(model, tau=0.6, backend=BACKEND)
        _logits(model, inputs)
        assert calls == [1]
        remove_medpruner(model)
        assert model.__dict__["forward"] is hooked_forward
        assert "generate" not in model.__dict__ and not hasattr(model, "medpruner_config")
        _logits(model, inputs)
        assert calls == [1, 1]
    finally:
        model.__dict__.pop("forward", None)


def test_one_gamma_means_the_same_for_qwen_families():
    """The same volume through Qwen3-VL (mean = std = 0.5) and Qwen2.5-VL (CLIP mean/std) keeps the same
    slices at every gamma, including gammas where the raw CLIP-scale distances would decide otherwise."""
    from medpruner_kernels import reference

    volume = synthetic_volume(8, seed=11, repeat_every=3)
    q3, q25 = tiny_qwen3_vl(), tiny_qwen2_5_vl()
    inputs3 = qwen_volume_inputs(qwen_processor("qwen3_vl"), [volume])
    inputs25 = qwen_volume_inputs(qwen_processor("qwen2_5_vl", clip_norm=True), [volume])
    cu = torch.tensor([0, volume.shape[0]])
    paper_rows = inputs3["pixel_values"].double().reshape(volume.shape[0], -1)
    clip_rows = inputs25["pixel_values"].double().reshape(volume.shape[0], -1)
    consecutive = (paper_rows[1:] - paper_rows[:-1]).abs().mean(1).sort().values.tolist()
    gammas = [(a + b) / 2 for a, b in zip(consecutive[:-1], consecutive[1:], strict=True)]
    differs = 0
    for gamma in gammas:
        apply_medpruner(q3, gamma=gamma, tau=1.0, merge=False, backend=BACKEND)
        apply_medpruner(q25, gamma=gamma, tau=1.0, merge=False, backend=BACKEND)
        with torch.no_grad():
            q3(**inputs3)
            q25(**inputs25)
        kept3 = [n > 0 for n in q3.medpruner_stats.tokens_per_slice[0]]
        kept25 = [n > 0 for n in q25.medpruner_stats.tokens_per_slice[0]]
        assert kept25 == kept3 == reference.iaf_select(paper_rows, gamma, cu)[0].tolist()
        differs += reference.iaf_select(clip_rows, gamma, cu)[0].tolist() != kept3
    assert differs > 0
