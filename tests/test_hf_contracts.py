"""The patched model keeps the Hugging Face contracts of the unpatched one (issue 20), for every family:
expanded generation (beam search, several returned sequences), assisted decoding, copies (deepcopy,
pickle, save_pretrained), training (gradient checkpointing; merge=True refused with a clear error),
image outputs, inputs the model accepts (placeholders under attention_mask == 0, Gemma3's non-square
mm_tokens_per_image, Qwen2.5-VL without mm_token_type_ids), continuation from a cache, and deferred
kernel checks raised by the request that queued them.

Each slice has several LLM tokens (16; 9 for the non-square Gemma3), so pruning shortens the sequence.
Identity settings (gamma=-1, tau=1, merge=False) must equal the unpatched model; with pruning on the
reference is the unpatched model run on independently pruned inputs (the oracles of _tiny_models).
"""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_expected_pruned,
    gemma_processor,
    gemma_processor_with,
    gemma_volume_inputs,
    qwen_expected_pruned,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_gemma3_non_square,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from conftest import available_backends  # noqa: E402
from medpruner import apply_medpruner, prune_inputs, remove_medpruner  # noqa: E402

from medpruner_kernels import _validation  # noqa: E402

IDENTITY = dict(gamma=-1.0, tau=1.0, merge=False)
PRUNING = dict(gamma=0.05, tau=0.6, merge=True)
KERNEL_BACKENDS = available_backends(
    cpp_ops=("iaf_select", "nucleus_select_cpu", "attention_importance", "merge_tokens")
)


def _qwen2_5_window_order(visual, grid):
    from transformers.vision_utils import get_vision_window_index

    order, _ = get_vision_window_index(
        grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size, kwargs={},
    )
    return order


FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, functools.partial(qwen_processor, "qwen3_vl"), qwen_volume_inputs,
                 functools.partial(qwen_expected_pruned, temperature=2.0)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, functools.partial(qwen_processor, "qwen2_5_vl", clip_norm=True),
                   qwen_volume_inputs,
                   functools.partial(qwen_expected_pruned, temperature=1.0, window_order=_qwen2_5_window_order)),
    "gemma3": (tiny_gemma3, gemma_processor, gemma_volume_inputs,
               functools.partial(gemma_expected_pruned, temperature=2.0)),
}
QWEN = ("qwen3_vl", "qwen2_5_vl")


class Family:
    def __init__(self, name):
        build, processor, self._inputs, self._oracle = FAMILIES[name]
        self.name, self.model, self.processor = name, build(), processor()

    def batch(self):
        """Two volumes of different depth (left padding in the shorter row), 16 tokens per slice."""
        return self._inputs(self.processor, [synthetic_volume(5, seed=1), synthetic_volume(3, seed=2)])

    def single(self):
        return self._inputs(self.processor, [synthetic_volume(4, seed=3)])

    def pruned_call(self, inputs, model=None, **pruning):
        return self._oracle(model or self.model, inputs, mode="fast", **pruning)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: a second intra-op thread gains nothing and, on busy shared cores, its
    spin-waits multiplied this file's time several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    return Family(request.param)


@pytest.fixture
def family(tiny):
    remove_medpruner(tiny.model)
    yield tiny
    remove_medpruner(tiny.model)


def only(*names):
    return pytest.mark.parametrize("tiny", names, indirect=True)


def _image_token(model):
    return model.config.image_token_id


def _per_row_features(model, call):
    """The oracle's kept features split the way the unpatched model's encoder output is: one entry
    per request row here (generate repeats entries per row by counting each row's placeholders)."""
    image = call["mm_encoder_outputs"]["image"]
    counts = (call["input_ids"] == _image_token(model)).sum(1).tolist()
    features = image.pooler_output
    if isinstance(features, torch.Tensor):  # Gemma3: one tensor, one token per entry
        image.pooler_output = features.reshape(features.shape[0], 1, features.shape[-1])
        return call
    image.pooler_output = torch.cat(features).split(counts)
    if getattr(image, "deepstack_features", None):
        image.deepstack_features = [torch.cat(level).split(counts) for level in image.deepstack_features]
    return call


def _generate(model, inputs, **kwargs):
    settings = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True)
    settings.update(kwargs)
    return model.generate(**inputs, **settings)


def _assert_same_generation(got, expected, prompt_length, expected_prompt_length):
    assert torch.equal(got.sequences[:, prompt_length:], expected.sequences[:, expected_prompt_length:])
    for mine, theirs in zip(got.scores, expected.scores, strict=True):
        finite = torch.isfinite(theirs)
        assert torch.equal(finite, torch.isfinite(mine))
        torch.testing.assert_close(mine[finite], theirs[finite], rtol=1e-4, atol=1e-4)


EXPANSIONS = {"beams": dict(num_beams=2), "beams_and_returns": dict(num_beams=3, num_return_sequences=2)}


# --------------------------------------------------------------------------- 1. expanded generation
@pytest.mark.parametrize("expansion", list(EXPANSIONS))
def test_expanded_generate_at_identity_equals_unpatched(family, expansion):
    model, inputs = family.model, family.batch()
    expected = _generate(model, inputs, **EXPANSIONS[expansion])
    apply_medpruner(model, **IDENTITY, backend="torch")
    got = _generate(model, inputs, **EXPANSIONS[expansion])
    length = inputs["input_ids"].shape[1]
    assert torch.equal(got.sequences, expected.sequences)
    _assert_same_generation(got, expected, length, length)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores)


def _pruned_cases():
    cases = [(name, "torch", expansion) for name in FAMILIES for expansion in EXPANSIONS]
    # the other kernels once each (the Triton interpreter is slow: one family, one expansion)
    cases += [("qwen3_vl", backend, "beams_and_returns") for backend in KERNEL_BACKENDS if backend != "torch"]
    return cases


@pytest.mark.parametrize("tiny, backend, expansion", _pruned_cases(), indirect=["tiny"])
def test_expanded_generate_with_pruning_equals_pruned_inputs(family, backend, expansion):
    model, inputs = family.model, family.batch()
    call, _ = family.pruned_call(inputs, **PRUNING)
    expected = _generate(model, _per_row_features(model, call), **EXPANSIONS[expansion])
    apply_medpruner(model, **PRUNING, backend=backend)
    got = _generate(model, inputs, **EXPANSIONS[expansion])
    assert model.medpruner_stats.tokens_after < model.medpruner_stats.tokens_before
    _assert_same_generation(got, expected, inputs["input_ids"].shape[1], call["input_ids"].shape[1])
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 2. no autograd in generate
@pytest.mark.parametrize("pruning", [IDENTITY, PRUNING], ids=["identity", "pruning"])
def test_assisted_decoding_equals_greedy(family, pruning):
    """The model as its own assistant (candidates checked by the model itself): the same tokens as plain
    greedy decoding. The assistant deep-copies the features, which needs them without autograd."""
    model, inputs = family.model, family.single()
    unpatched = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    apply_medpruner(model, **pruning, backend="torch")
    greedy = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assisted = model.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=model)
    assert torch.equal(assisted, greedy)
    if pruning is IDENTITY:
        assert torch.equal(greedy, unpatched)


# --------------------------------------------------------------------------- 3. copies
def test_deepcopy_runs_its_own_weights(family):
    model, inputs = family.model, family.batch()
    apply_medpruner(model, **IDENTITY, backend="torch")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.lm_head.weight.mul_(-2.0)
        got = clone(**inputs).logits
        original = model(**inputs).logits
        plain = remove_medpruner(copy.deepcopy(clone))
        expected = plain(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[valid], original[valid])
    assert clone.medpruner_stats is not None and clone.medpruner_config == model.medpruner_config


def test_pickle_and_save_pretrained_keep_the_model(family, tmp_path):
    model, inputs = family.model, family.batch()
    apply_medpruner(model, **PRUNING, backend="torch")
    with torch.no_grad():
        expected = model(**inputs).logits
        restored = pickle.loads(pickle.dumps(model))
        got = restored(**inputs).logits
    assert restored.medpruner_stats.tokens_after == model.medpruner_stats.tokens_after
    torch.testing.assert_close(got, expected)
    with torch.no_grad():
        restored.lm_head.weight.zero_()
        assert not torch.equal(restored(**inputs).logits, model(**inputs).logits)
    # save_pretrained writes the weights only (the patch is not part of a checkpoint): the reloaded
    # model is the unpatched one with the same weights, and apply_medpruner makes it prune again
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert not hasattr(reloaded, "medpruner_config")
    apply_medpruner(reloaded, config=model.medpruner_config)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)


# --------------------------------------------------------------------------- 4. training
def _text_labels(inputs, model):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    first = (mask.cumsum(1) == 1) & mask.bool()
    return ids.masked_fill((ids == _image_token(model)) | (mask == 0) | first, -100)


def _loss_and_grads(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_with_gradient_checkpointing(family):
    """Policy: the selection (IAF, DINS, merge targets) takes no gradient; the kept tokens' features stay
    differentiable, so merge=False trains (with gradient checkpointing too). merge=True has no
    backward and raises a ValueError naming it in training mode."""
    model = copy.deepcopy(family.model).train()
    inputs = family.batch()
    labels = _text_labels(inputs, model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    expected_loss, expected = _loss_and_grads(model, inputs, labels)
    apply_medpruner(model, **IDENTITY, backend="torch")
    loss, grads = _loss_and_grads(model, inputs, labels)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    vision = [n for n in grads if "visual" in n or "vision_tower" in n]
    assert vision and all(torch.isfinite(grads[n]).all() for n in vision)

    apply_medpruner(model, **dict(PRUNING, merge=False), backend="torch")
    checkpointed_loss, checkpointed = _loss_and_grads(model, inputs, labels)
    assert model.medpruner_stats.tokens_after < model.medpruner_stats.tokens_before
    model.activation_checkpointing_disable()
    plain_loss, plain = _loss_and_grads(model, inputs, labels)
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(plain[n].abs().sum() > 0 for n in vision)

    apply_medpruner(model, **PRUNING, backend="torch")
    with pytest.raises(ValueError, match="merge"):
        model(**inputs, labels=labels)
    with torch.no_grad():
        model(**inputs, labels=labels)  # evaluation inside a training loop still prunes with the merge


# --------------------------------------------------------------------------- 5. image outputs
@only(*QWEN)
def test_image_outputs_at_identity_equal_unpatched(family):
    model, inputs = family.model, family.batch()
    flags = dict(output_hidden_states=True)
    with torch.no_grad():
        expected = model(**inputs, **flags).image_outputs
        apply_medpruner(model, **IDENTITY, backend="torch")
        got = model(**inputs, **flags).image_outputs
    assert len(got.pooler_output) == len(expected.pooler_output) == inputs["image_grid_thw"].shape[0]
    for mine, theirs in zip(got.pooler_output, expected.pooler_output, strict=True):
        torch.testing.assert_close(mine, theirs)
    assert got.hidden_states is not None and len(got.hidden_states) == len(expected.hidden_states)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state)
    deep = getattr(got, "deepstack_features", None) or [], getattr(expected, "deepstack_features", None) or []
    for mine, theirs in zip(*deep, strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b)


@only(*QWEN)
def test_image_outputs_with_pruning_have_one_entry_per_image(family):
    model, inputs = family.model, family.batch()
    apply_medpruner(model, **PRUNING, backend="torch")
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True).image_outputs
    stats = model.medpruner_stats
    per_image = [n for volume in stats.tokens_per_slice for n in volume]
    assert [len(entry) for entry in got.pooler_output] == per_image
    assert 0 in per_image  # a slice IAF dropped keeps an (empty) entry
    # the tower's outputs cover the slices it encoded (fast mode: those IAF kept), 4 patches a token
    assert got.hidden_states is not None
    assert got.last_hidden_state.shape[0] == 4 * 16 * stats.slices_encoded < 4 * stats.tokens_before


# --------------------------------------------------------------------------- 6. accepted inputs
def _mask_one_placeholder(inputs, model):
    masked = dict(inputs)
    mask = inputs["attention_mask"].clone()
    positions = (inputs["input_ids"][0] == _image_token(model)).nonzero().flatten()
    mask[0, positions[5]] = 0  # inside the first slice of the first row
    masked["attention_mask"] = mask
    return masked


@only("gemma3")
def test_placeholder_under_masked_attention_is_accepted(family):
    """Gemma3 fills a placeholder under attention_mask == 0 like any other (Qwen's own M-RoPE index
    refuses a partly masked image, so the unpatched Qwen models give no reference there)."""
    model = family.model
    inputs = _mask_one_placeholder(family.batch(), model)
    with torch.no_grad():
        expected = model(**inputs).logits
        apply_medpruner(model, **IDENTITY, backend="torch")
        got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    # the masked placeholder stays (masked) in the repacked rows: only the left padding differs
    kept = valid | (inputs["input_ids"] == _image_token(model))
    assert got.shape[1] == kept.sum(1).max()
    got_valid = got[:, -got.shape[1] :][valid[:, -got.shape[1] :]]
    torch.testing.assert_close(got_valid, expected[:, -got.shape[1] :][valid[:, -got.shape[1] :]], rtol=1e-5,
                               atol=1e-5)
    apply_medpruner(model, **PRUNING, backend="torch")
    with torch.no_grad():
        pruned = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruned.shape == (2, inputs["input_ids"].shape[1] + 2)
    assert model.medpruner_stats.tokens_after < model.medpruner_stats.tokens_before


def test_gemma3_non_square_tokens_per_image():
    model = tiny_gemma3_non_square()
    processor = gemma_processor_with(image_seq_length=9)
    inputs = gemma_volume_inputs(processor, [synthetic_volume(4, seed=1), synthetic_volume(2, seed=2)])
    assert model.config.mm_tokens_per_image == 10
    with torch.no_grad():
        expected = model(**inputs).logits
        apply_medpruner(model, **IDENTITY, backend="torch")
        got = model(**inputs).logits
        valid = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
        assert model.medpruner_stats.tokens_before == 9 * 6
        apply_medpruner(model, **PRUNING, backend="torch")
        model(**inputs)
    assert model.medpruner_stats.tokens_after < 9 * 6


@only("qwen2_5_vl")
def test_qwen2_5_without_mm_token_type_ids(family):
    model = family.model
    inputs = {k: v for k, v in family.batch().items() if k != "mm_token_type_ids"}
    single = {k: v for k, v in family.single().items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        expected_logits = model(**single).logits
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        apply_medpruner(model, **IDENTITY, backend="torch")
        torch.testing.assert_close(model(**single).logits, expected_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
        apply_medpruner(model, **PRUNING, backend="torch")
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert model.medpruner_stats.tokens_after < model.medpruner_stats.tokens_before


# --------------------------------------------------------------------------- 7. continuation
@pytest.mark.parametrize("pruning", [IDENTITY, PRUNING], ids=["identity", "pruning"])
def test_continuation_from_the_cache_equals_one_call(family, pruning):
    """3 tokens, then 1 more from the returned cache (no pixels, as the unpatched model takes it), equal
    4 tokens in one call, with another request run in between (the model's own rope_deltas change).
    The continued generate's own decoding steps reach the patched forward with that cache too: they
    must run as they are (a rewrite as a caller's continuation cut their attention mask)."""
    model, inputs = family.model, family.batch()
    apply_medpruner(model, **pruning, backend="torch")
    whole = _generate(model, inputs, max_new_tokens=4)
    first = _generate(model, inputs, max_new_tokens=3)
    _generate(model, family.single(), max_new_tokens=2)
    rows = inputs["input_ids"].shape[0]
    follow = {k: v for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    follow["input_ids"] = first.sequences
    follow["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(rows, 3, dtype=torch.long)], 1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            follow[key] = torch.cat([inputs[key], torch.zeros(rows, 3, dtype=inputs[key].dtype)], 1)
    last = _generate(model, follow, max_new_tokens=1, cache=first.cache)
    assert torch.equal(last.sequences, whole.sequences)
    torch.testing.assert_close(last.scores[0], whole.scores[3], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- deferred checks
@only("qwen3_vl")
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_deferred_checks_raise_in_the_request_that_queued_them(family, entry):
    """Fast mode with a budget reads the host once, before the tower: a NaN in the DINS scores (a NaN
    weight in the scored block) is queued after that read and must be raised by this request."""
    model = copy.deepcopy(family.model)
    with torch.no_grad():
        model.model.visual.blocks[-1].attn.qkv.weight[0, 0] = float("nan")
    apply_medpruner(model, gamma=0.05, tau=0.6, budget=0.5, backend="torch")
    inputs = family.single()
    with _validation.deferred_checks(), pytest.raises(ValueError, match="NaN"), torch.no_grad():
        if entry == "forward":
            model(**inputs)
        else:
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert _validation.pending_error_count() == 0


@only("qwen3_vl")
def test_a_request_leaves_the_callers_pending_checks_alone(family):
    """Errors belong to the request (issue 29 item 4): a patched call raises only what it queued, and
    a check the caller queued before it stays the caller's."""
    model = copy.deepcopy(family.model)
    apply_medpruner(model, gamma=0.05, tau=0.6, budget=0.5, backend="torch")
    with _validation.deferred_checks():
        _validation.check_or_defer(torch.tensor(True), "caller: an earlier op's bad input")
        with torch.no_grad():
            model(**family.single())
        assert _validation.pending_error_count() == 1
        with pytest.raises(ValueError, match="caller: an earlier op's bad input"):
            _validation.raise_pending_errors()


# --------------------------------------------------------------------------- 8. the caller's layout
def _type_keys(inputs):
    return [k for k in ("mm_token_type_ids", "token_type_ids") if k in inputs]


def _right_padded(inputs):
    """The same batch with each row's padding moved to its end (a right-padded processor's output)."""
    out = dict(inputs)
    order = torch.argsort((inputs["attention_mask"] == 0).long(), dim=1, stable=True)
    for key in ("input_ids", "attention_mask", *_type_keys(inputs)):
        out[key] = inputs[key].gather(1, order)
    if "position_ids" in inputs:
        positions = inputs["position_ids"]
        out["position_ids"] = positions.gather(-1, order.expand_as(positions))
    return out


def _logits(model, inputs, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def _pad_labels(inputs, model):
    """Labels as a careless caller passes them: every token, padding included, images excluded."""
    ids = inputs["input_ids"]
    return ids.masked_fill(ids == _image_token(model), -100)


@pytest.mark.parametrize("side", ["left", "right"])
def test_identity_keeps_the_callers_layout_and_loss(family, side):
    """At identity the patched model is the unpatched one on the caller's own layout: logits at every
    valid position, and the loss with labels on the padding too (no term gained or lost per row)."""
    model = family.model
    inputs = family.batch()
    inputs = _right_padded(inputs) if side == "right" else inputs
    labels = _pad_labels(inputs, model)
    expected = _logits(model, inputs, labels=labels)
    apply_medpruner(model, **IDENTITY, backend="torch")
    got = _logits(model, inputs, labels=labels)
    valid = inputs["attention_mask"].bool()
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits[valid], expected.logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)


def _is_right_padded(mask):
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def test_right_padded_batch_stays_right_padded_with_pruning(family):
    """With pruning on, a right-padded batch comes back right-padded: prune_inputs' call is the
    oracle's pruned call with each row's padding at its end, and the patched logits (and loss) equal
    the unpatched model's on it, position by position."""
    model = family.model
    inputs = _right_padded(family.batch())
    call, _ = family.pruned_call(family.batch(), **PRUNING)
    expected_call = _right_padded(call)
    valid = expected_call["attention_mask"].bool()
    labels = _text_labels(expected_call, model)
    expected = _logits(model, expected_call, labels=labels)

    pruned = prune_inputs(model, inputs, **PRUNING, backend="torch")
    assert _is_right_padded(pruned["attention_mask"])
    assert torch.equal(pruned["attention_mask"].bool(), valid)
    assert torch.equal(pruned["input_ids"][valid], expected_call["input_ids"][valid])

    apply_medpruner(model, **PRUNING, backend="torch")
    got = _logits(model, inputs, labels=_text_labels(inputs, model))
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits[valid], expected.logits[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_each_row_is_pruned_independently_of_the_others(family, side):
    """A row's pruned tokens and logits are those of the same row sent alone."""
    model = family.model
    inputs = family.batch()
    inputs = _right_padded(inputs) if side == "right" else inputs
    apply_medpruner(model, **PRUNING, backend="torch")
    batch_call = prune_inputs(model, inputs, **PRUNING, backend="torch")
    batch_logits = _logits(model, inputs).logits
    batch_mask = batch_call["attention_mask"].bool()
    single = family._inputs(family.processor, [synthetic_volume(3, seed=2)])
    single_call = prune_inputs(model, single, **PRUNING, backend="torch")
    single_logits = _logits(model, single).logits
    assert torch.equal(batch_call["input_ids"][1][batch_mask[1]], single_call["input_ids"][0])
    torch.testing.assert_close(batch_logits[1][batch_mask[1]], single_logits[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 9. torch.compile
class _CountingBackend:
    """torch.compile backend that runs the captured graphs eagerly and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward

    def __deepcopy__(self, memo):  # CompileConfig deep-copies its fields; keep the one counter
        return self


@pytest.mark.parametrize("pruning", [IDENTITY, PRUNING], ids=["identity", "pruning"])
def test_compiled_patched_model_forward(family, pruning):
    """torch.compile(model, fullgraph=True) on a patched model: the pruning runs eagerly, the original
    forward is compiled as one graph, and the logits are the eager patched model's."""
    torch._dynamo.reset()
    model = copy.deepcopy(family.model)
    inputs = family.batch()
    apply_medpruner(model, **pruning, backend="torch")
    expected = _logits(model, inputs).logits
    backend = _CountingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    got = _logits(compiled, inputs).logits
    assert backend.graphs >= 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("pruning", [IDENTITY, PRUNING], ids=["identity", "pruning"])
def test_generate_with_static_cache_and_compiled_decoding(family, pruning):
    """generate(cache_implementation="static") with transformers' compiled decoding (fullgraph, as on
    CUDA; forced on CPU here) gives the tokens of the eager patched model's generate."""
    from transformers import CompileConfig

    torch._dynamo.reset()
    model = copy.deepcopy(family.model)
    inputs = family.batch()
    apply_medpruner(model, **pruning, backend="torch")
    settings = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        expected = model.generate(**inputs, **settings, disable_compile=True)
    backend = _CountingBackend()
    compile_config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    compile_config._compile_all_devices = True
    with torch.no_grad():
        got = model.generate(**inputs, **settings, compile_config=compile_config)
    assert backend.graphs >= 1
    assert torch.equal(got, expected)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- 10. caller's positions
def _gapped_positions(family, inputs):
    """Positions the model would not compute itself: its own numbering with a gap of 9 after the
    first valid tokens of each row (as a packed or padding-free batch has)."""
    mask = inputs["attention_mask"]
    text = (mask.cumsum(1) - 1).clamp(min=0)
    gap = 9 * (text >= 4).long() * mask
    if family.name == "gemma3":
        return text + gap
    rope, _ = family.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=mask,
    )
    return torch.cat([text.unsqueeze(0), rope]) + gap


@pytest.mark.parametrize("side", ["left", "right"])
def test_identity_honours_the_callers_position_ids(family, side):
    model = family.model
    inputs = family.batch()
    inputs["position_ids"] = _gapped_positions(family, inputs)
    inputs = _right_padded(inputs) if side == "right" else inputs
    expected = _logits(model, inputs).logits
    without = {k: v for k, v in inputs.items() if k != "position_ids"}
    assert not torch.allclose(expected, _logits(model, without).logits, atol=1e-3)  # the gap matters
    apply_medpruner(model, **IDENTITY, backend="torch")
    got = _logits(model, inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_callers_position_ids_are_pruned_with_the_sequence(family):
    """Positions that name each token's column come back naming, at every kept position, the column
    the kept token had: the caller's numbering is pruned with the sequence, never recomputed."""
    model = family.model
    inputs = family.batch()
    batch, length = inputs["input_ids"].shape
    columns = torch.arange(length).expand(batch, length)
    inputs["position_ids"] = columns if family.name == "gemma3" else columns.expand(4, batch, length)
    call = prune_inputs(model, inputs, **PRUNING, backend="torch")
    positions = call["position_ids"]
    assert positions.shape[-2:] == call["input_ids"].shape
    if family.name != "gemma3":
        assert torch.equal(positions, positions[:1].expand_as(positions))
        positions = positions[0]
    kept = call["attention_mask"].bool()
    assert call["input_ids"].shape[1] < length
    assert torch.equal(call["input_ids"][kept], inputs["input_ids"].gather(1, positions)[kept])
    # and the model uses them: the unpatched model on the call gives the patched model's logits
    apply_medpruner(model, **PRUNING, backend="torch")
    got = _logits(model, inputs).logits
    remove_medpruner(model)
    torch.testing.assert_close(got[kept], _logits(model, call).logits[kept], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- 11. wrong image count
@pytest.mark.parametrize("deferred", [False, True], ids=["immediate", "deferred"])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_one_image_too_few_raises_value_error_like_the_unpatched_model(family, entry, deferred):
    """The last image removed (its pixels and, for Qwen, its grid row) with its placeholders left in
    the text: a ValueError naming the mismatch, as the unpatched forward raises (the unpatched Qwen
    generate raises StopIteration from get_rope_index); also when the count check is deferred (CUDA)."""
    model = family.model
    inputs = dict(family.batch())
    if "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        inputs["pixel_values"] = inputs["pixel_values"][: -int(grid[-1].prod())]
        inputs["image_grid_thw"] = grid[:-1]
    else:
        inputs["pixel_values"] = inputs["pixel_values"][:-1]

    def run():
        with torch.no_grad():
            if entry == "forward":
                return model(**inputs)
            return model.generate(**inputs, max_new_tokens=1, do_sample=False)

    if entry == "forward":
        with pytest.raises(ValueError):
            run()
    apply_medpruner(model, **PRUNING, backend="torch")
    with _validation.deferred_checks(deferred), pytest.raises(ValueError, match="do not match"):
        run()
    assert _validation.pending_error_count() == 0
