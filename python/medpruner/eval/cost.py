"""The prefill cost of a pruned request, measured and modelled.

Measured (per sample and method, on the machine that ran the eval): the seconds of the vision tower, of
the pruning (selection, merge and the sequence surgery) and of the LLM prefill, taken with forward hooks
on the tower and a streamer that marks the prompt's hand-over to the LLM and its first token
(:class:`PrefillTimer`). A method with a slice stage (MedPruner, IAF, uniform slices) decides on pixels
before the encoder, so its dropped slices are never encoded (the eval's pipeline encodes the kept slices
only, once, as a deployment does).

Modelled (:func:`prefill_cost`): FLOPs of the tower and the LLM prefill from a model's shape
(:class:`ModelShape`, from a Hugging Face config), at a sample's volume size as each model's processor
would resize its slices, and the time at a stated roofline: each part takes the larger of its FLOPs at
the peak dense rate and its weights (bf16) at the memory bandwidth. A matrix product of m x k by k x n
is 2mkn FLOPs; attention costs 4 x (query tokens) x (keys attended) x (heads x head dim); the LLM is
causal (sliding-window layers attend at most their window); only the last position goes through the
LM head. Norms, rotary embeddings and softmax are left out (a few % at these sizes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["GPU_ROOFLINES", "PUBLISHED", "ModelShape", "PrefillTimer", "prefill_cost", "published_costs"]


@dataclass(frozen=True)
class Roofline:
    name: str
    flops_per_second: float
    bytes_per_second: float


# NVIDIA H100 SXM5 80GB datasheet: 989.4 TFLOP/s dense BF16 tensor core, 3.35 TB/s HBM3.
GPU_ROOFLINES = {"h100-sxm": Roofline("H100 SXM bf16 (989 TFLOP/s, 3.35 TB/s)", 989.4e12, 3.35e12)}
DEFAULT_ROOFLINE = "h100-sxm"
BYTES_PER_PARAM = 2  # bf16 weights


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a VLM. Vision: ``vis_layers`` blocks of width ``vis_hidden`` and MLP
    ``vis_mlp`` (``vis_mlp_mats`` matrices: 2 GELU, 3 gated), ``patch`` pixels a side (``temporal`` frames
    a patch), ``merge`` x ``merge`` patches per LLM token (Qwen's merger; Gemma3 pools ``merge`` x
    ``merge``), ``window`` patches attended in windowed blocks (0: every block is global) except the
    ``full_blocks``; ``mergers`` merger MLPs (Qwen3-VL's deepstack adds some); a fixed ``image_side`` or
    the Qwen resize rule (``min_pixels``..``max_pixels``). LLM: ``layers`` of width ``hidden``, MLP
    ``mlp`` (gated), ``heads`` x ``head_dim`` queries, ``kv_heads``, ``vocab``; ``sliding`` window in
    ``sliding_layers`` of the layers (0: none). ``wrapper_tokens``: text tokens around each image."""

    name: str
    vis_layers: int
    vis_hidden: int
    vis_mlp: int
    vis_mlp_mats: int
    patch: int
    temporal: int
    merge: int
    window: int
    full_blocks: int
    mergers: int
    layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    image_side: int = 0
    min_pixels: int = 0
    max_pixels: int = 0
    sliding: int = 0
    sliding_layers: int = 0
    wrapper_tokens: int = 2

    @classmethod
    def from_config(cls, config, name: str | None = None, *, min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 1280):
        """The shape of a Qwen3-VL, Qwen2.5-VL or Gemma3 ``config`` (a transformers config or a dict)."""
        get = _getter(config)
        vision, text = _getter(get("vision_config")), _getter(get("text_config"))
        kind = get("model_type")
        heads = text("num_attention_heads")
        common = dict(
            name=name or kind, layers=text("num_hidden_layers"), hidden=text("hidden_size"),
            mlp=text("intermediate_size"), heads=heads, kv_heads=text("num_key_value_heads", heads),
            head_dim=text("head_dim", None) or text("hidden_size") // heads, vocab=text("vocab_size"),
        )
        if kind == "gemma3":
            pattern = text("sliding_window_pattern", 6)
            tokens = get("mm_tokens_per_image", 256)
            patches = (vision("image_size") // vision("patch_size")) ** 2
            return cls(vis_layers=vision("num_hidden_layers"), vis_hidden=vision("hidden_size"),
                       vis_mlp=vision("intermediate_size"), vis_mlp_mats=2, patch=vision("patch_size"), temporal=1,
                       merge=math.isqrt(patches // tokens), window=0, full_blocks=0, mergers=1,
                       image_side=vision("image_size"), sliding=text("sliding_window", 0),
                       sliding_layers=common["layers"] - common["layers"] // pattern, wrapper_tokens=4, **common)
        if kind not in ("qwen3_vl", "qwen2_5_vl"):
            raise ValueError(f"config: the cost model knows qwen3_vl, qwen2_5_vl and gemma3, got {kind!r}")
        windowed = kind == "qwen2_5_vl"
        patch, merge = vision("patch_size"), vision("spatial_merge_size")
        return cls(vis_layers=vision("depth"), vis_hidden=vision("hidden_size"), vis_mlp=vision("intermediate_size"),
                   vis_mlp_mats=3 if windowed else 2, patch=patch, temporal=vision("temporal_patch_size", 2),
                   merge=merge, window=(vision("window_size") // patch) ** 2 if windowed else 0,
                   full_blocks=len(vision("fullatt_block_indexes", ())) if windowed else 0,
                   mergers=1 + len(vision("deepstack_visual_indexes", ()) or ()), min_pixels=min_pixels,
                   max_pixels=max_pixels, **common)

    # ------------------------------------------------------------------------------------ sizes
    def slice_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches of one slice of ``height`` x ``width`` pixels after the processor's
        resize: a fixed square side, or Qwen's rule (each side rounded to a multiple of patch x merge,
        the area brought within [min_pixels, max_pixels] keeping the aspect)."""
        if self.image_side:
            side = self.image_side // self.patch
            return side, side
        factor = self.patch * self.merge
        rows, cols = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
        if rows * cols > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            rows = max(factor, math.floor(height / beta / factor) * factor)
            cols = max(factor, math.floor(width / beta / factor) * factor)
        elif rows * cols < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            rows, cols = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
        return rows // self.patch, cols // self.patch

    def slice_tokens(self, height: int, width: int) -> int:
        rows, cols = self.slice_grid(height, width)
        return rows * cols // self.merge**2

    # ------------------------------------------------------------------------------------ FLOPs
    def tower_flops(self, patches: int) -> float:
        """One image of ``patches`` patches through the tower and its merger(s)/projector."""
        d = self.vis_hidden
        embed = 2 * patches * 3 * self.temporal * self.patch**2 * d
        windowed = self.vis_layers - self.full_blocks if self.window else 0
        attended = windowed * min(patches, self.window) + (self.vis_layers - windowed) * patches
        dense = 2 * patches * (4 * d * d + self.vis_mlp_mats * d * self.vis_mlp)
        blocks = self.vis_layers * dense + 4 * patches * attended * d
        tokens = patches // self.merge**2
        if self.image_side:  # Gemma3: pool, then one linear map to the LLM width
            head = 2 * tokens * d * self.hidden
        else:
            wide = d * self.merge**2
            head = self.mergers * 2 * tokens * (wide * wide + wide * self.hidden)
        return embed + blocks + head

    def prefill_flops(self, tokens: int) -> float:
        """The LLM prefill of ``tokens`` tokens (causal), with the LM head on the last position."""
        q, kv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        dense = 2 * tokens * (d * (q + 2 * kv) + q * d + 3 * d * self.mlp)
        causal = tokens * (tokens + 1) / 2
        if self.sliding and tokens > self.sliding:
            w = self.sliding
            windowed = w * (w + 1) / 2 + (tokens - w) * w
        else:
            windowed = causal
        global_layers = self.layers - self.sliding_layers
        attention = 4 * q * (global_layers * causal + self.sliding_layers * windowed)
        return self.layers * dense + attention + 2 * d * self.vocab

    def tower_params(self) -> float:
        d = self.vis_hidden
        per_block = 4 * d * d + self.vis_mlp_mats * d * self.vis_mlp
        wide = d * self.merge**2
        head = d * self.hidden if self.image_side else self.mergers * (wide * wide + wide * self.hidden)
        return self.vis_layers * per_block + head + 3 * self.temporal * self.patch**2 * d

    def llm_params(self) -> float:
        q, kv, d = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        return self.layers * (d * (q + 2 * kv) + q * d + 3 * d * self.mlp) + d * self.vocab


def _getter(config):
    if isinstance(config, dict):
        return lambda key, default=None: config.get(key, default)
    return lambda key, default=None: getattr(config, key, default)


# The published configurations (config.json of each Hugging Face repository).
PUBLISHED = {
    "qwen3-vl-8b": ModelShape.from_config({
        "model_type": "qwen3_vl",
        "vision_config": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 16,
                          "temporal_patch_size": 2, "spatial_merge_size": 2, "deepstack_visual_indexes": [8, 16, 24]},
        "text_config": {"num_hidden_layers": 36, "hidden_size": 4096, "intermediate_size": 12288,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936},
    }, "Qwen3-VL-8B", min_pixels=65536, max_pixels=16777216),
    "qwen2.5-vl-7b": ModelShape.from_config({
        "model_type": "qwen2_5_vl",
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "patch_size": 14,
                          "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31]},
        "text_config": {"num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
    }, "Qwen2.5-VL-7B", min_pixels=3136, max_pixels=12845056),
    "medgemma-4b": ModelShape.from_config({
        "model_type": "gemma3", "mm_tokens_per_image": 256,
        "vision_config": {"num_hidden_layers": 27, "hidden_size": 1152, "intermediate_size": 4304,
                          "patch_size": 14, "image_size": 896},
        "text_config": {"num_hidden_layers": 34, "hidden_size": 2560, "intermediate_size": 10240,
                        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208,
                        "sliding_window": 1024, "sliding_window_pattern": 6},
    }, "MedGemma-4B"),
}


def prefill_cost(shape: ModelShape, *, slices: int, height: int, width: int, slices_encoded: int,
                 visual_fraction: float, slices_kept: int, text_tokens: int, roofline: str = DEFAULT_ROOFLINE) -> dict:
    """The modelled prefill of one request on ``shape``: a volume of ``slices`` slices of ``height`` x
    ``width`` pixels, ``slices_encoded`` of them through the tower, ``visual_fraction`` of the full
    volume's visual tokens into the LLM with the wrappers of ``slices_kept`` slices and ``text_tokens``
    other tokens. Returns FLOPs (tower, LLM) and milliseconds at the roofline."""
    rows, cols = shape.slice_grid(height, width)
    patches = rows * cols
    visual = round(visual_fraction * slices * patches / shape.merge**2)
    llm_tokens = visual + text_tokens + shape.wrapper_tokens * slices_kept
    tower = slices_encoded * shape.tower_flops(patches)
    llm = shape.prefill_flops(llm_tokens)
    peak = GPU_ROOFLINES[roofline]

    def seconds(flops, params):
        return max(flops / peak.flops_per_second, params * BYTES_PER_PARAM / peak.bytes_per_second)

    tower_s = seconds(tower, shape.tower_params()) if slices_encoded else 0.0
    llm_s = seconds(llm, shape.llm_params())
    return {"tower_tflops": tower / 1e12, "llm_tflops": llm / 1e12, "llm_tokens": llm_tokens,
            "patches_encoded": slices_encoded * patches, "ms": 1e3 * (tower_s + llm_s)}


def published_costs(record: dict, volume_shape, text_tokens: int) -> dict:
    """:func:`prefill_cost` of a record's selection on every published configuration."""
    slices, height, width = (int(v) for v in volume_shape)
    total = record["slices_total"] or 1
    fraction = record["tokens_kept"] / record["tokens_total"] if record["tokens_total"] else 0.0
    return {key: prefill_cost(shape, slices=slices, height=height, width=width,
                              slices_encoded=round(record["slices_encoded"] * slices / total),
                              visual_fraction=fraction, slices_kept=round(record["slices_kept"] * slices / total),
                              text_tokens=text_tokens)
            for key, shape in PUBLISHED.items()}


class PrefillTimer:
    """Splits one ``generate`` call's prefill into tower, pruning and LLM seconds: forward hooks time
    every call of the vision ``tower``; as a ``streamer``, the first ``put`` marks the prompt handed to
    the LLM (after any pruning) and the second the first new token. ``start()`` marks the call."""

    def __init__(self, tower):
        self.tower_calls: list[tuple[float, float]] = []
        self.marks: list[float] = []
        self._opened = 0.0
        self._handles = [tower.register_forward_pre_hook(self._enter), tower.register_forward_hook(self._leave)]

    def _enter(self, *_):
        self._opened = time.perf_counter()

    def _leave(self, *_):
        self.tower_calls.append((self._opened, time.perf_counter()))

    def start(self) -> None:
        self.tower_calls.clear()
        self.marks = [time.perf_counter()]

    def put(self, _value) -> None:
        if len(self.marks) < 3:
            self.marks.append(time.perf_counter())

    def end(self) -> None:
        pass

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def split(self) -> dict[str, float] | None:
        """Seconds of ``tower`` (every call), ``pruning`` and ``llm_prefill``; None when the generation
        did not reach a first token."""
        if len(self.marks) < 3:
            return None
        start, handed, first = self.marks[:3]

        def inside(a, b):
            return sum(end - begin for begin, end in self.tower_calls if begin >= a and end <= b)

        before, during = inside(start, handed), inside(handed, first)
        return {"tower": before + during, "pruning": max(0.0, handed - start - before),
                "llm_prefill": max(0.0, first - handed - during)}


def tower_module(model) -> Any:
    """The vision tower of a Qwen-VL (``visual``) or Gemma3 (``vision_tower``) model."""
    inner = getattr(model, "model", model)
    for name in ("visual", "vision_tower"):
        if hasattr(inner, name):
            return getattr(inner, name)
    raise ValueError(f"model: no vision tower found on {type(model).__name__}")
