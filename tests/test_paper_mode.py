"""``mode="paper"`` against a float64 re-derivation of the published MedPruner rule (issue 19), on the
tiny MedGemma and Qwen3-VL models, on every kernel backend.

The rule, as the published code applies it (re-derived here in plain float64 loops, not taken from it):

* MedGemma scores and merge keys are averaged over strips of ``kernel**2`` consecutive raster patches of
  the SigLIP grid (16 for MedGemma), not over the projector's spatial blocks (which fast mode keeps);
* every slice, dropped ones included, goes through DINS and the merge; the final mask is the IAF mask
  (a dropped slice: its token 0 only) AND the slice's own selection (nucleus + contextual targets), and a
  kept target carries ``target + mean(members)``. So token 0 of a dropped slice reaches the LLM merged
  when it is a contextual target.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_processor,
    gemma_volume_inputs,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_qwen3_vl,
)
from conftest import available_backends  # noqa: E402
from medpruner.adapters import adapter_for  # noqa: E402
from medpruner.config import MedPrunerConfig  # noqa: E402

BACKENDS = available_backends(cpp_ops=("iaf_select", "nucleus_select_cpu", "attention_importance", "merge_tokens"))
TEMPERATURE = 2.0  # the paper's T for Qwen3-VL and MedGemma (both adapters' default)
CONTEXT_FRAC = 0.05
RTOL = ATOL = 1e-5  # float32 model and kernels against float64 (sums of at most a few hundred terms)


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3(), gemma_processor()


@pytest.fixture(scope="module")
def qwen3():
    return tiny_qwen3_vl(), qwen_processor("qwen3_vl")


def _volumes(backend, *, dropped=True):
    # The Triton interpreter is slow (its attention_importance takes ~15 s per 256-patch image here):
    # there, two slices where the second nearly repeats the first and is dropped (its token 0 is a
    # merged target in both models), or one slice when no slice has to be dropped; elsewhere a varlen
    # batch of two volumes.
    if backend == "triton":
        return [synthetic_volume(3, seed=1)[1 : 3 if dropped else 2]]
    return [synthetic_volume(6, seed=1), synthetic_volume(3, seed=2)]


# ------------------------------------------------------------------------------ float64 re-derivation
def _received(q, k, patches, scale):
    """Per patch, the attention it receives inside its image: softmax over keys, mean over heads, sum
    over queries (float64, one image at a time)."""
    out = []
    for start in range(0, q.shape[0], patches):
        qi, ki = q[start : start + patches].double(), k[start : start + patches].double()
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", qi, ki) * scale, dim=-1)
        out.append(probs.mean(0).sum(0))
    return torch.cat(out)


def _strips(values, group):
    """Means over consecutive groups of ``group`` rows (the published code's raster pooling)."""
    return values.reshape(values.shape[0] // group, group, -1).mean(1)


def _spatial_blocks(values, images, side, kernel):
    """Means over ``kernel x kernel`` spatial blocks of each image's ``side x side`` grid, row-major."""
    blocks = side // kernel
    grid = values.reshape(images, blocks, kernel, blocks, kernel, -1)
    return grid.mean(dim=(2, 4)).reshape(images * blocks * blocks, -1)


def _iaf(rows, gamma, depths):
    keep = []
    for start, depth in zip([sum(depths[:i]) for i in range(len(depths))], depths, strict=True):
        anchor = start
        keep.append(True)
        for s in range(start + 1, start + depth):
            far = (rows[s] - rows[anchor]).abs().mean().item() > gamma
            keep.append(far)
            anchor = s if far else anchor
    return keep


def _official_slice(scores, keys, features, tau, iaf_kept):
    """One slice under the published rule: (final keep, features, whether token 0 is a target with
    members). float64 throughout."""
    n = scores.numel()
    probs = torch.softmax(scores / TEMPERATURE, dim=0)
    order = torch.sort(probs, descending=True, stable=True).indices
    reached = (torch.cumsum(probs[order], 0) >= tau).nonzero()
    count = int(reached[0]) + 1 if reached.numel() else n
    selected = torch.zeros(n, dtype=torch.bool)
    selected[order[:count]] = True
    rest = (~selected).nonzero().flatten()
    num_targets = max(int(CONTEXT_FRAC * n), 1)
    step = max(1, rest.numel() // num_targets)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool)
    is_target[torch.arange(0, rest.numel(), step)[:num_targets]] = True
    targets, members = rest[is_target], rest[~is_target]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    out = features.clone()
    token0_merged = False
    if members.numel() and targets.numel():
        choice = (unit[members] @ unit[targets].T).argmax(1)
        for j, target in enumerate(targets.tolist()):
            mine = members[choice == j]
            if mine.numel():
                out[target] = features[target] + features[mine].mean(0)
                token0_merged |= target == 0
    dins = selected.clone()
    dins[targets] = True
    iaf = torch.ones(n, dtype=torch.bool) if iaf_kept else torch.arange(n) == 0
    return iaf & dins, out, token0_merged


def _official(scores, keys, features, tokens, slice_keep, tau):
    keeps, outs, merged_token0 = [], [], []
    for i, kept in enumerate(slice_keep):
        span = slice(i * tokens, (i + 1) * tokens)
        keep, out, token0_merged = _official_slice(scores[span], keys[span], features[span], tau, kept)
        keeps.append(keep)
        outs.append(out)
        merged_token0.append(token0_merged and not kept)
    return torch.cat(keeps), torch.cat(outs), merged_token0


# ------------------------------------------------------------------------------ the models' q/k
def _gemma_tokens(model, inputs, mode):
    """(scores, keys, features, tokens per slice) of the tiny MedGemma, pooled per LLM token as
    ``mode`` pools them, from float64 recomputation of the last SigLIP layer's attention."""
    inner = model.model
    projector = inner.multi_modal_projector
    side, kernel = projector.patches_per_image, projector.kernel_size
    tower = inner.vision_tower
    attn = (getattr(tower, "encoder", None) or tower.vision_model.encoder).layers[-1].self_attn
    taken = {}
    handles = [
        attn.q_proj.register_forward_hook(lambda m, a, out: taken.__setitem__("q", out)),
        attn.k_proj.register_forward_hook(lambda m, a, out: taken.__setitem__("k", out)),
    ]
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
    for handle in handles:
        handle.remove()
    images, patches = taken["q"].shape[:2]
    q = taken["q"].reshape(images * patches, attn.num_heads, -1)
    k = taken["k"].reshape(images * patches, attn.num_heads, -1)
    received = _received(q, k, patches, attn.scale).unsqueeze(1)
    head_keys = k.double().mean(1)
    if mode == "paper":
        scores, keys = _strips(received, kernel * kernel), _strips(head_keys, kernel * kernel)
    else:
        scores = _spatial_blocks(received, images, side, kernel)
        keys = _spatial_blocks(head_keys, images, side, kernel)
    tokens = model.config.mm_tokens_per_image
    return scores.flatten(), keys, features.reshape(images * tokens, -1).double(), tokens


def _qwen3_tokens(model, inputs, mode):
    """The Qwen3-VL counterpart (post-RoPE q/k of the last block, merger groups of 4 patches)."""
    inner = model.model
    visual = inner.visual
    attn = visual.blocks[-1].attn
    taken = {}

    def take_inputs(module, args, kwargs):
        taken["rope"], taken["cu"] = kwargs["position_embeddings"], kwargs["cu_seqlens"]

    handles = [
        attn.register_forward_pre_hook(take_inputs, with_kwargs=True),
        attn.qkv.register_forward_hook(lambda m, a, out: taken.__setitem__("qkv", out)),
    ]
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output
    for handle in handles:
        handle.remove()
    n = taken["qkv"].shape[0]
    q, k, _ = taken["qkv"].reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *taken["rope"])
    sizes = taken["cu"].diff().tolist()
    assert len(set(sizes)) == 1, "the test volumes have one grid"
    unit = visual.spatial_merge_size**2
    scores = _strips(_received(q, k, sizes[0], attn.scaling).unsqueeze(1), unit).flatten()
    keys = _strips(k.double().mean(1), unit)
    return scores, keys, torch.cat(features).double(), sizes[0] // unit


FAMILIES = {
    "medgemma": (gemma_volume_inputs, _gemma_tokens),
    "qwen3_vl": (qwen_volume_inputs, _qwen3_tokens),
}


def _family(name, gemma, qwen3):
    return gemma if name == "medgemma" else qwen3


# ------------------------------------------------------------------------------ 1. MedGemma pooling
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_medgemma_pooling_per_mode(gemma, backend, mode):
    """Paper mode pools scores and keys over raster strips of 16 patches, fast mode over the projector's
    4 x 4 blocks; the two disagree far beyond the tolerance, so each mode is pinned to its own rule."""
    model, processor = gemma
    inputs = gemma_volume_inputs(processor, _volumes(backend, dropped=False))
    adapter = adapter_for(model)
    config = MedPrunerConfig(mode=mode, backend=backend)
    call = dict(inputs)
    layer = config.importance_layer % adapter.vision_depth(model)
    with torch.no_grad():
        encoded = adapter.encode(model, call, adapter.layout(model, call), None, layer, config)
    scores, keys, _, _ = _gemma_tokens(model, inputs, mode)
    other_scores, other_keys, _, _ = _gemma_tokens(model, inputs, "fast" if mode == "paper" else "paper")
    assert (scores - other_scores).abs().max() > 100 * ATOL and (keys - other_keys).abs().max() > 100 * ATOL
    torch.testing.assert_close(encoded.scores.double(), scores, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(encoded.keys.double(), keys, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ 2. dropped slices merge
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_paper_mode_matches_published_rule(gemma, qwen3, family, backend):
    """Final keep mask and the features handed to the LLM equal the float64 published rule, including
    token 0 of a dropped slice that is a contextual target (it carries target + mean of its members)."""
    model, processor = _family(family, gemma, qwen3)
    volume_inputs, tokens_of = FAMILIES[family]
    volumes = _volumes(backend)
    inputs = volume_inputs(processor, volumes)
    gamma, tau = 0.05, 0.6
    config = MedPrunerConfig(gamma=gamma, tau=tau, mode="paper", backend=backend, record_tokens=True)
    with torch.no_grad():
        pruned = adapter_for(model).prune(model, config, dict(inputs))
    got = pruned.call["mm_encoder_outputs"]["image"].pooler_output
    got = (torch.cat(got) if isinstance(got, tuple) else got).flatten(0, -2)

    scores, keys, features, tokens = tokens_of(model, inputs, "paper")
    rows = inputs["pixel_values"].double().reshape(len(scores) // tokens, -1)
    slice_keep = _iaf(rows, gamma, [v.shape[0] for v in volumes])
    keep, merged, token0_merged = _official(scores, keys, features, tokens, slice_keep, tau)
    # The case this test exists for: a dropped slice whose token 0 is a target with members.
    assert any(token0_merged), "the inputs must have a dropped slice whose token 0 is merged"
    assert not all(slice_keep)
    assert torch.equal(pruned.stats.token_keep, keep)
    torch.testing.assert_close(got.double(), merged[keep], rtol=RTOL, atol=ATOL)


def test_medgemma_paper_mode_needs_blocks_that_tile_the_grid(gemma):
    """9 tokens from a 16 x 16 patch grid: the projector's 5 x 5 blocks leave a border, so no strip of
    consecutive patches is one token's; paper mode says so (naming the mode) before any kernel runs."""
    import copy

    from transformers import Gemma3ForConditionalGeneration

    config = copy.deepcopy(gemma[0].config)
    config.mm_tokens_per_image = 9
    model = Gemma3ForConditionalGeneration(config).eval()
    assert model.model.multi_modal_projector.patches_per_image % model.model.multi_modal_projector.kernel_size
    call = {"pixel_values": torch.zeros(2, 3, 64, 64)}
    adapter = adapter_for(model)
    layout = adapter.layout(model, call)
    with pytest.raises(ValueError, match="mode=.paper"), torch.no_grad():
        adapter.encode(model, call, layout, None, 1, MedPrunerConfig(mode="paper", backend="torch"))
