"""Token-level pruning with a vision-language model: loading a local checkpoint (or building the demo's
tiny Qwen3-VL), feeding it a volume's slices, and running IAF + DINS + merge inside its ``generate``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medpruner._tiny import image_only_processor
from medpruner.cli.common import CommandError, synchronize

DEFAULT_TAU = 0.9
MODEL_RESOLUTION = 224
DEFAULT_PROMPT = "Describe the findings in this volume."


@dataclass
class TokenOptions:
    """Token-level pruning with a model (DINS + merge inside its ``generate``)."""

    bundle: ModelBundle
    tau: float
    mode: str
    merge: bool
    prompt: str
    resolution: int
    max_new_tokens: int
    # Slices whose heatmaps are drawn first when IAF keeps them (the demo's lesion slices).
    heatmap_slices: tuple[int, ...] = ()


@dataclass
class ModelBundle:
    """A loaded VLM ready for ``apply_medpruner``: its processor, the volume_to_inputs family, the
    slice size multiple its processor would otherwise resize to, and a name for reports."""

    model: object
    processor: object
    family: str
    pixel_key: str
    size_multiple: int
    merge_size: int
    name: str
    # The slice side the model was trained at (the shipped checkpoint's 64), else None (MODEL_RESOLUTION).
    resolution: int | None = None


def _size_multiple(processor) -> tuple[int, int]:
    image_processor = getattr(processor, "image_processor", None)
    patch = int(getattr(image_processor, "patch_size", 0) or 0)
    merge = int(getattr(image_processor, "merge_size", 0) or 1)
    return (patch * merge if patch else 32), merge


def _bundle(model, processor, name: str) -> ModelBundle:
    from medpruner.adapters import adapter_for

    try:
        adapter = adapter_for(model)
    except TypeError as err:
        raise CommandError(f"--model {name}: {err}") from err
    # Adapters and volume_to_inputs share one family vocabulary (medpruner.config.FAMILIES).
    family = adapter.family
    multiple, merge = _size_multiple(processor)
    return ModelBundle(model, processor, family, adapter.pixel_key, multiple, merge, name)


# Processors that build a video processor (which needs torchvision) next to the image one.
_IMAGE_ONLY_PROCESSORS = {
    "Qwen3VLForConditionalGeneration": "Qwen3VLProcessor",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLProcessor",
}


# ``--model`` names of the checkpoints that ship with the package (no folder, no download), and the
# synthetic task version each was trained on.
SHIPPED_MODELS = {"tiny-vqa": 1, "tiny-vqa-v2": 2}


def shipped_version(path: str | None) -> int | None:
    """The synthetic task version of ``--model`` when it names a shipped checkpoint (and no folder of
    that name exists), else None."""
    if path is None or str(path) not in SHIPPED_MODELS or Path(path).exists():
        return None
    return SHIPPED_MODELS[str(path)]


def load_model(path: str, device) -> ModelBundle:
    """A local Hugging Face checkpoint (model + processor), or a shipped synthetic-VQA checkpoint named
    as in :data:`SHIPPED_MODELS` (:func:`tiny_vqa`); nothing is downloaded."""
    version = shipped_version(path)
    if version is not None:
        return tiny_vqa(device, version)
    if not Path(path).is_dir():
        raise CommandError(
            f"--model {path}: not a folder (pass a local checkpoint saved with save_pretrained, or "
            f"{' / '.join(SHIPPED_MODELS)} for the shipped checkpoint)"
        )
    import transformers

    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype="auto"
        )
        try:
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError:
            class_name = _IMAGE_ONLY_PROCESSORS.get(type(model).__name__)
            if class_name is None:
                raise
            processor = image_only_processor(
                getattr(transformers, class_name),
                transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True),
                transformers.AutoTokenizer.from_pretrained(path, local_files_only=True),
            )
    except (OSError, ValueError, KeyError, ImportError) as err:
        raise CommandError(
            f"--model {path}: cannot load the checkpoint ({type(err).__name__}: {err})"
        ) from err
    return _bundle(model.to(device).eval(), processor, str(path))


TINY_QWEN3_VL_NAME = "tiny random-weight Qwen3-VL (built from a config)"


def tiny_qwen3_vl(device, seed: int = 0) -> ModelBundle:
    """A Qwen3-VL of a few hundred thousand random weights with a byte-level tokenizer, built from a
    config (no download): the real architecture and processor path, fast enough for a 2-core demo."""
    from transformers import Qwen3VLProcessor

    from medpruner._tiny import qwen_image_processor, qwen_tokenizer, tiny_qwen3_vl_model

    tokenizer = qwen_tokenizer()
    processor = image_only_processor(Qwen3VLProcessor, qwen_image_processor(8), tokenizer)
    model = tiny_qwen3_vl_model(tokenizer, seed=seed, device=device)
    return _bundle(model, processor, TINY_QWEN3_VL_NAME)


TINY_VQA_NAME = "tiny synthetic-VQA Qwen3-VL (medpruner.checkpoints.tiny_vqa)"
TINY_VQA_V2_NAME = "tiny synthetic-VQA v2 Qwen3-VL (medpruner.checkpoints.tiny_vqa_v2)"


def tiny_vqa_name(version: int = 1) -> str:
    """The model name records of shipped checkpoint ``version`` carry (part of the eval's resume key)."""
    return TINY_VQA_NAME if version == 1 else TINY_VQA_V2_NAME


def model_name(path: str) -> str:
    """The name a loaded ``--model path`` records: a shipped checkpoint's name, else the path."""
    version = shipped_version(path)
    return str(path) if version is None else tiny_vqa_name(version)


def check_model_path(path: str | None) -> None:
    """``--model`` for engines whose workers load the model themselves: a folder or a shipped name."""
    if path is not None and shipped_version(path) is None and not Path(path).is_dir():
        raise CommandError(f"--model {path}: not a folder (a local checkpoint saved with save_pretrained, or "
                           f"{' / '.join(SHIPPED_MODELS)} for a shipped checkpoint)")


def tiny_vqa(device, version: int = 1) -> ModelBundle:
    """Shipped checkpoint ``version``, trained on synthetic 3D VQA task ``version``
    (:mod:`medpruner.checkpoints`): real, lesion-focused attention, offline. Feed it slices of
    ``tiny_vqa_resolution(version)`` pixels."""
    from medpruner.checkpoints import load_tiny_vqa, tiny_vqa_resolution

    name = next(name for name, v in SHIPPED_MODELS.items() if v == version)
    try:
        model, processor = load_tiny_vqa(device, version=version)
    except (OSError, ValueError) as err:
        raise CommandError(f"--model {name}: cannot load the shipped checkpoint ({err})") from err
    bundle = _bundle(model, processor, tiny_vqa_name(version))
    bundle.resolution = tiny_vqa_resolution(version)
    return bundle


def model_slices(slices: np.ndarray, resolution: int, multiple: int) -> np.ndarray:
    """[0, 1] slices resized so the longer side is about ``resolution`` and both sides are multiples of
    ``multiple`` (patch x merge): the processor then keeps them as they are, and IAF in the report sees
    exactly the pixels the model sees."""
    import torch

    height, width = slices.shape[1:]
    scale = resolution / max(height, width)
    size = tuple(max(multiple, int(round(n * scale / multiple)) * multiple) for n in (height, width))
    if size == (height, width):
        return np.ascontiguousarray(slices, dtype=np.float32)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None],
        size=size,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[:, 0]
    return resized.clamp_(0.0, 1.0).numpy()


@dataclass
class TokenResult:
    record: dict
    timings: dict[str, float]
    heatmap_slices: list[int]
    importance: list[np.ndarray]
    keep: list[np.ndarray]
    grid: tuple[int, int] | None


def model_inputs(bundle: ModelBundle, slices: np.ndarray, prompt: str):
    """Processor inputs of one volume (one image per slice) on the model's device."""
    import torch

    from medpruner import volume_to_inputs

    inputs = volume_to_inputs(bundle.processor, torch.from_numpy(slices), prompt, family=bundle.family)
    return inputs.to(next(bundle.model.parameters()).device)


def run_model(
    bundle: ModelBundle,
    inputs,
    slice_keep: np.ndarray,
    *,
    gamma: float,
    tau: float,
    mode: str,
    merge: bool,
    backend: str,
    prompt: str,
    max_new_tokens: int,
    max_heatmaps: int = 8,
    heatmap_slices=(),
) -> TokenResult:
    """The whole MedPruner pipeline on a model: IAF + DINS + merge inside its ``generate``.

    ``inputs``: from :func:`model_inputs`; ``slice_keep``: the IAF mask the report computed on the
    same pixels (its kept slices are the ones with heatmaps: those of ``heatmap_slices`` first, the
    rest spread evenly over the volume, ``max_heatmaps`` in all)."""
    import torch

    from medpruner import apply_medpruner, remove_medpruner

    model = bundle.model
    device = next(model.parameters()).device
    timings = {}
    try:
        apply_medpruner(
            model, gamma=gamma, tau=tau, mode=mode, merge=merge, backend=backend, record_tokens=True
        )
    except (TypeError, ValueError) as err:
        raise CommandError(f"--model {bundle.name}: {err}") from err
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        synchronize(device)
    finally:
        stats = model.medpruner_stats
        remove_medpruner(model)
    timings["generate"] = time.perf_counter() - start
    timings["prune"] = stats.prune_seconds
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    tokenizer = getattr(bundle.processor, "tokenizer", bundle.processor)
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)

    grid = None
    if "image_grid_thw" in inputs:
        _, rows, cols = (int(n) for n in inputs["image_grid_thw"][0].tolist())
        grid = (rows // bundle.merge_size, cols // bundle.merge_size)
    tokens_per_slice = [int(n) for n in stats.tokens_per_slice[0]]
    record = {
        "model": bundle.name,
        "family": bundle.family,
        "mode": mode,
        "tau": tau,
        "merge": merge,
        "prompt": prompt,
        "token_grid": None if grid is None else list(grid),
        "slices_kept": int(stats.slices_kept[0]),
        "slices_encoded": int(stats.slices_encoded),
        "tokens_before": int(stats.tokens_before),
        "tokens_after": int(stats.tokens_after),
        "token_retention": float(stats.retention),
        "tokens_per_slice": tokens_per_slice,
        "generated_tokens": int(new_tokens.numel()),
        "generated_text": text,
    }

    importance, keep, shown = [], [], []
    encoded = np.flatnonzero(slice_keep) if mode == "fast" else np.arange(slice_keep.size)
    # The report's IAF ran on the model's own pixels, so the slice selections agree; should they not
    # (an adapter with another slice rule), the report gets no heatmaps rather than misplaced ones.
    # Every slice of a volume has one resolution, so the encoded slices hold equal token counts.
    recorded = stats.token_scores is not None
    token_count = stats.token_scores.numel() if recorded else 0
    per_encoded = token_count // max(len(encoded), 1)
    same_slices = per_encoded > 0 and per_encoded * len(encoded) == token_count
    if mode == "fast":
        same_slices = same_slices and np.array_equal(np.asarray(tokens_per_slice) > 0, slice_keep)
    if same_slices:
        scores, final_keep = stats.token_scores.numpy(), stats.token_keep.numpy()
        offsets = np.arange(len(encoded) + 1) * per_encoded
        position_of = {int(s): p for p, s in enumerate(encoded)}
        kept = np.flatnonzero(slice_keep)
        preferred = [int(i) for i in heatmap_slices if 0 <= int(i) < slice_keep.size and slice_keep[int(i)]]
        spread = kept[np.unique(np.linspace(0, kept.size - 1, min(max_heatmaps, kept.size)).round().astype(int))]
        preferred = sorted(preferred)[:max_heatmaps]
        # the slices asked for first (the demo's lesions), then an even spread of the others
        chosen = preferred + sorted(set(int(i) for i in spread) - set(preferred))[: max_heatmaps - len(preferred)]
        for index in chosen:
            p = position_of[index]
            shown.append(index)
            importance.append(scores[offsets[p] : offsets[p + 1]])
            keep.append(final_keep[offsets[p] : offsets[p + 1]].astype(bool))
    return TokenResult(record, timings, shown, importance, keep, grid)


def token_options(args, bundle: ModelBundle, resolution: int) -> TokenOptions:
    return TokenOptions(
        bundle=bundle,
        tau=DEFAULT_TAU if args.tau is None else args.tau,
        mode=args.mode or "fast",
        merge=not args.no_merge,
        prompt=args.prompt,
        # The bundle is None in the Ray job's driver (each actor loads its own model).
        resolution=args.resolution or getattr(bundle, "resolution", None) or resolution,
        max_new_tokens=args.max_new_tokens,
    )
