"""MedPruner configuration, the ``apply_medpruner`` / ``remove_medpruner`` entry points, and the
"volume + prompt -> processor inputs" helper.

``apply_medpruner(model, ...)`` patches a loaded Hugging Face VLM in place (the Liger-Kernel habit):
its ``forward`` and ``generate`` then prune the visual tokens of every request that carries images, and
``model.medpruner_stats`` describes the last pruned request. Each sequence of a batch is one volume: all
its images are that volume's slices, in acquisition order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("medpruner")

MODES = ("fast", "paper")
BACKENDS = ("auto", "triton", "cpp", "torch")


@dataclass
class MedPrunerConfig:
    """The MedPruner knobs (paper-faithful defaults; see DESIGN.md "Paper-faithful defaults").

    gamma: IAF threshold on the mean absolute difference between a slice and its anchor, on the
        model's normalised pixel tensor (the paper's [-1, 1] scale); a negative gamma keeps every slice.
    tau: DINS nucleus mass kept per slice, in (0, 1]; 1 keeps every token.
    merge: merge the pruned tokens into contextual tokens (VisionZip-style) instead of dropping them.
    mode: "fast" runs IAF on the pixels before the vision tower (dropped slices are never encoded);
        "paper" encodes every slice and keeps the first token of each dropped slice, as the paper's code.
    temperature: softmax temperature of the DINS masses; None takes the family default (2 for Qwen3-VL
        and Gemma3/MedGemma, 1 otherwise).
    importance_layer: index of the vision-tower block whose attention gives the token importance
        (negative counts from the end; -1 is the last block, the paper's choice).
    context_frac: contextual tokens per slice, as a fraction of its tokens (at least one).
    min_keep: tokens every kept slice keeps at least (>= 1: a kept slice never loses all its tokens).
    backend: kernel backend, "auto" | "triton" | "cpp" | "torch".
    record_tokens: keep CPU copies of the token scores and the final keep mask in the stats (for
        heatmaps and debugging); costs one device-to-host copy per request, so off by default.
    """

    gamma: float = 0.05
    tau: float = 0.9
    merge: bool = True
    mode: str = "fast"
    temperature: float | None = None
    importance_layer: int = -1
    context_frac: float = 0.05
    min_keep: int = 1
    backend: str = "auto"
    record_tokens: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong type) naming the first bad field."""
        _check_real("gamma", self.gamma)
        if not math.isfinite(float(self.gamma)):
            raise ValueError(f"MedPrunerConfig.gamma must be finite, got {self.gamma!r}")
        _check_real("tau", self.tau)
        if not 0.0 < float(self.tau) <= 1.0:
            raise ValueError(f"MedPrunerConfig.tau must be in (0, 1], got {self.tau!r}")
        if not isinstance(self.merge, bool):
            raise TypeError(f"MedPrunerConfig.merge must be a bool, got {type(self.merge).__name__}")
        if not isinstance(self.record_tokens, bool):
            raise TypeError(
                f"MedPrunerConfig.record_tokens must be a bool, got {type(self.record_tokens).__name__}"
            )
        if self.mode not in MODES:
            raise ValueError(f"MedPrunerConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.temperature is not None:
            _check_real("temperature", self.temperature)
            if not (math.isfinite(float(self.temperature)) and float(self.temperature) > 0):
                raise ValueError(f"MedPrunerConfig.temperature must be > 0 or None, got {self.temperature!r}")
        if isinstance(self.importance_layer, bool) or not isinstance(self.importance_layer, int):
            raise TypeError(
                f"MedPrunerConfig.importance_layer must be an int, got {type(self.importance_layer).__name__}"
            )
        _check_real("context_frac", self.context_frac)
        if not 0.0 <= float(self.context_frac) <= 1.0:
            raise ValueError(f"MedPrunerConfig.context_frac must be in [0, 1], got {self.context_frac!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int):
            raise TypeError(f"MedPrunerConfig.min_keep must be an int, got {type(self.min_keep).__name__}")
        if self.min_keep < 1:
            raise ValueError(f"MedPrunerConfig.min_keep must be >= 1, got {self.min_keep}")
        if self.backend not in BACKENDS:
            raise ValueError(f"MedPrunerConfig.backend must be one of {BACKENDS}, got {self.backend!r}")

    def resolved_temperature(self, family_default: float) -> float:
        return float(family_default if self.temperature is None else self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **json_kwargs) -> str:
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MedPrunerConfig:
        if not isinstance(values, dict):
            raise TypeError(f"MedPrunerConfig.from_dict expects a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"MedPrunerConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> MedPrunerConfig:
        return cls.from_dict(json.loads(text))


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"MedPrunerConfig.{name} must be a real number, got {type(value).__name__}")


@dataclass
class PruneStats:
    """What the last pruned request kept. Lists are per volume (one per batch row).

    slices_total / slices_kept: slices per volume before and after IAF.
    tokens_per_slice: visual tokens kept per slice, for every slice of the volume (a slice dropped by IAF
        shows 0 in fast mode and 1 in paper mode, where it keeps its first token).
    tokens_before / tokens_after: visual tokens of the whole batch before and after pruning.
    retention: tokens_after / tokens_before.
    slices_encoded: slices that went through the vision tower (all of them in paper mode).
    prune_seconds: wall time of the pruning stage (vision tower included), measured on the host after
        the request's single sync, so it covers the queued device work.
    token_scores / token_keep: only with ``MedPrunerConfig.record_tokens``: float32 and bool CPU
        tensors over every token of the encoded slices (flat, in encoding order): the DINS importance
        and the final keep mask (merge targets included).
    """

    mode: str
    slices_total: list[int] = field(default_factory=list)
    slices_kept: list[int] = field(default_factory=list)
    tokens_per_slice: list[list[int]] = field(default_factory=list)
    tokens_before: int = 0
    tokens_after: int = 0
    slices_encoded: int = 0
    prune_seconds: float = 0.0
    token_scores: torch.Tensor | None = None
    token_keep: torch.Tensor | None = None

    @property
    def retention(self) -> float:
        return self.tokens_after / self.tokens_before if self.tokens_before else 1.0

    def summary(self) -> str:
        return (
            f"medpruner[{self.mode}]: slices {sum(self.slices_kept)}/{sum(self.slices_total)} kept "
            f"({self.slices_encoded} encoded), visual tokens {self.tokens_after}/{self.tokens_before} "
            f"({100.0 * self.retention:.1f}%), {1e3 * self.prune_seconds:.1f} ms"
        )


def apply_medpruner(
    model,
    *,
    gamma: float = 0.05,
    tau: float = 0.9,
    merge: bool = True,
    mode: str = "fast",
    temperature: float | None = None,
    importance_layer: int = -1,
    context_frac: float = 0.05,
    min_keep: int = 1,
    backend: str = "auto",
    record_tokens: bool = False,
    config: MedPrunerConfig | None = None,
):
    """Patch a loaded Hugging Face VLM in place so that its ``forward`` and ``generate`` prune visual
    tokens with MedPruner, and return it.

    The knobs are those of :class:`MedPrunerConfig` (pass ``config=`` to reuse one; the keyword values
    are then ignored). Calling it again on a patched model replaces the configuration. A model class no
    adapter handles raises TypeError naming the class; a bad value raises ValueError naming the field.
    """
    from medpruner.adapters import adapter_for

    if config is None:
        config = MedPrunerConfig(
            gamma=gamma,
            tau=tau,
            merge=merge,
            mode=mode,
            temperature=temperature,
            importance_layer=importance_layer,
            context_frac=context_frac,
            min_keep=min_keep,
            backend=backend,
            record_tokens=record_tokens,
        )
    elif not isinstance(config, MedPrunerConfig):
        raise TypeError(f"config must be a MedPrunerConfig, got {type(config).__name__}")
    else:
        config.validate()
    adapter = adapter_for(model)
    adapter.check_config(model, config)
    adapter.patch(model, config)
    return model


def remove_medpruner(model):
    """Undo :func:`apply_medpruner` (a no-op on a model that is not patched); returns the model."""
    from medpruner.adapters import unpatch

    unpatch(model)
    return model


# ---------------------------------------------------------------------------------- volume -> inputs
FAMILIES = ("qwen3_vl", "qwen2_5_vl", "medgemma")

# Three CT windows (center, width) in Hounsfield units, one per RGB channel, in the spirit of MedGemma's
# CT recipe: the full range, soft tissue, lung. Pass your own to ``ct_windows_to_rgb`` to match a checkpoint.
CT_RGB_WINDOWS = ((0.0, 2048.0), (40.0, 400.0), (-600.0, 1500.0))


def ct_windows_to_rgb(volume_hu, windows=CT_RGB_WINDOWS) -> torch.Tensor:
    """``[D, H, W]`` Hounsfield units -> ``[D, H, W, 3]`` in [0, 1], one CT window per channel."""
    hu = torch.as_tensor(volume_hu, dtype=torch.float32)
    if hu.ndim != 3:
        raise ValueError(f"volume_hu must be [D, H, W], got shape {tuple(hu.shape)}")
    channels = []
    for center, width in windows:
        low = center - width / 2.0
        channels.append(((hu - low) / width).clamp(0.0, 1.0))
    return torch.stack(channels, dim=-1)


def volume_to_inputs(
    processor,
    volume,
    prompt: str,
    *,
    family: str,
    resolution: int | tuple[int, int] | None = None,
    ct_windows: bool = False,
    return_tensors: str = "pt",
):
    """Build processor inputs that feed a volume the paper's way: one image per slice.

    Args:
        processor: the model's Hugging Face processor.
        volume: ``[D, H, W]`` tensor/array with values in [0, 1] (grey slices, replicated to RGB), or
            ``[D, H, W, 3]`` RGB in [0, 1]; with ``ct_windows=True`` a ``[D, H, W]`` volume in Hounsfield
            units, turned into MedGemma's 3-window RGB (full range, soft tissue, lung).
        prompt: the question, placed after the slices.
        family: "qwen3_vl" / "qwen2_5_vl" (each slice is ``<|vision_start|><|image_pad|><|vision_end|>``)
            or "medgemma" (each slice is ``SLICE i: <start_of_image>``).
        resolution: pinned per-slice size (pixels, a square side or (H, W)): slices are resized to it so
            every slice of the volume has the same grid (IAF compares slices element-wise). None keeps
            the volume's size (Qwen) or the processor's fixed size (MedGemma).

    Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values, ...).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    slices = _volume_to_rgb(volume, ct_windows)
    if resolution is not None:
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"resolution must be a positive int or (H, W), got {resolution!r}")
        slices = torch.nn.functional.interpolate(
            slices.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False, antialias=True
        ).permute(0, 2, 3, 1)
        slices = slices.clamp(0.0, 1.0)
    images = [s.numpy() for s in slices]
    images_kwargs: dict[str, Any] = {"do_rescale": False}
    if family in ("qwen3_vl", "qwen2_5_vl"):
        height, width = images[0].shape[:2]
        image_processor = processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        pixels = max(factor, round(height / factor) * factor) * max(factor, round(width / factor) * factor)
        # A pixel budget of exactly the slice's own (factor-rounded) area makes the processor's smart
        # resize a no-op beyond the rounding, so every slice gets the same grid on every call (IAF needs
        # one grid per volume); choose ``resolution`` to set the token count per slice.
        images_kwargs["size"] = {"shortest_edge": pixels, "longest_edge": pixels}
        image_text = "<|vision_start|><|image_pad|><|vision_end|>" * len(images)
        text = _chat(processor, image_text, prompt)
    else:
        image_text = "".join(f"SLICE {i + 1}: {processor.boi_token}" for i in range(len(images)))
        text = _chat(processor, image_text, prompt)
    return processor(text=[text], images=[images], return_tensors=return_tensors, images_kwargs=images_kwargs)


def _volume_to_rgb(volume, ct_windows: bool) -> torch.Tensor:
    if ct_windows:
        return ct_windows_to_rgb(volume)
    data = torch.as_tensor(volume, dtype=torch.float32)
    if data.ndim == 3:
        data = data.unsqueeze(-1).expand(-1, -1, -1, 3)
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] == 0:
        raise ValueError(
            f"volume must be [D, H, W] or [D, H, W, 3] with D >= 1, got shape {tuple(data.shape)}"
        )
    if not torch.isfinite(data).all() or data.min() < 0 or data.max() > 1:
        raise ValueError(
            "volume values must be finite and in [0, 1] (window CT first, or pass ct_windows=True)"
        )
    return data.contiguous()


def _chat(processor, image_text: str, prompt: str) -> str:
    """The user turn through the processor's chat template when it has one, else the raw text."""
    template = getattr(processor, "chat_template", None) or getattr(
        processor.tokenizer, "chat_template", None
    )
    if not template:
        return image_text + prompt
    messages = [{"role": "user", "content": [{"type": "text", "text": image_text + prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
