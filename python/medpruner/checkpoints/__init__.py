"""Shipped checkpoints: small Qwen3-VLs trained offline by ``scripts/train_tiny_vqa.py`` on the
synthetic 3D VQA tasks of :mod:`medpruner.synthetic` (synthetic sanity benchmarks, not clinical models).

- ``tiny_vqa`` (v1): task v1 at 64-pixel slices with 16-pixel patches, 4 visual tokens per slice.
- ``tiny_vqa_v2``: the CT-like task v2 at 64-pixel slices with 8-pixel patches, 16 visual tokens per
  slice, so DINS ranks tokens. Its weights are package data once trained (:func:`load_tiny_vqa` with
  ``version=2`` says how to make them while they are missing).

The weights are package data (``<name>/model.safetensors``, fp16, the tied ``lm_head`` not stored); the
byte-level tokenizer and the image processor are rebuilt from code, so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

TINY_VQA_DIR = Path(__file__).resolve().parent / "tiny_vqa"
TINY_VQA_WEIGHTS = TINY_VQA_DIR / "model.safetensors"
# Slices are resized to this side before the processor: 16-pixel patches merged 2 x 2 give 2 x 2 = 4
# visual tokens per slice.
TINY_VQA_RESOLUTION = 64
TINY_VQA_PATCH = 16
TINY_VQA_V2_DIR = Path(__file__).resolve().parent / "tiny_vqa_v2"
TINY_VQA_V2_WEIGHTS = TINY_VQA_V2_DIR / "model.safetensors"
# 8-pixel patches merged 2 x 2: a 64-pixel slice is 8 x 8 patches and 4 x 4 = 16 visual tokens (the
# vision tower's 64 learned position embeddings are exactly that grid).
TINY_VQA_V2_RESOLUTION = 64
TINY_VQA_V2_PATCH = 8
TINY_VQA_VERSIONS = (1, 2)


def _check_version(version) -> int:
    if isinstance(version, bool) or version not in TINY_VQA_VERSIONS:
        raise ValueError(f"version must be one of {TINY_VQA_VERSIONS}, got {version!r}")
    return version


def tiny_vqa_patch(version: int = 1) -> int:
    """The patch side of checkpoint ``version`` (16 for v1, 8 for v2)."""
    return TINY_VQA_PATCH if _check_version(version) == 1 else TINY_VQA_V2_PATCH


def tiny_vqa_resolution(version: int = 1) -> int:
    """The slice side checkpoint ``version`` was trained at (64 for both)."""
    return TINY_VQA_RESOLUTION if _check_version(version) == 1 else TINY_VQA_V2_RESOLUTION


def tiny_vqa_weights(version: int = 1) -> Path:
    """Where the weights of checkpoint ``version`` live in the package."""
    return TINY_VQA_WEIGHTS if _check_version(version) == 1 else TINY_VQA_V2_WEIGHTS


def tiny_vqa_processor(padding_side: str = "left", *, version: int = 1):
    """The processor of checkpoint ``version``: byte-level tokenizer and an image processor with its
    patch side (16 pixels for v1, 8 for v2)."""
    from transformers import Qwen3VLProcessor

    from medpruner._tiny import image_only_processor, qwen_image_processor, qwen_tokenizer

    image_processor = qwen_image_processor(tiny_vqa_patch(version), max_merged_patches=64)
    return image_only_processor(Qwen3VLProcessor, image_processor, qwen_tokenizer(padding_side))


def tiny_vqa_config(tokenizer, *, version: int = 1):
    """The architecture of checkpoint ``version``: the tiny Qwen3-VL of :mod:`medpruner._tiny` widened to
    a text width of 128 (4 heads of dim 32: vLLM's CPU attention takes 32, 64 or 80), 2 text layers, a
    vision tower of width 64 (2 heads of dim 32), with 16-pixel (v1) or 8-pixel (v2) patches."""
    from medpruner._tiny import tiny_qwen3_vl_config

    return tiny_qwen3_vl_config(
        tokenizer,
        patch_size=tiny_vqa_patch(version),
        max_position_embeddings=4096,
        vision_width=64,
        text_width=128,
        head_dim=32,
        tie_word_embeddings=True,
    )


def build_tiny_vqa(tokenizer, *, seed: int = 0, version: int = 1):
    """The untrained model of :func:`tiny_vqa_config`, initialised after ``torch.manual_seed(seed)``
    (the global RNG state is put back afterwards), in eval mode, with greedy generation that stops at
    ``<|im_end|>``."""
    from medpruner._tiny import tiny_qwen3_vl_model

    return tiny_qwen3_vl_model(tokenizer, seed=seed, config=tiny_vqa_config(tokenizer, version=version))


def load_weights(model, path: Path):
    """``model`` with the fp16 weights of ``path`` (the tied ``lm_head`` is not stored), in float32
    eval mode; a file of another architecture raises ``ValueError`` naming what differs."""
    from safetensors.torch import load_file

    state = {name: tensor.float() for name, tensor in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the architecture: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def load_tiny_vqa(device="cpu", *, version: int = 1):
    """Shipped checkpoint ``version`` and its processor, offline: ``(model, processor)``, the model in
    float32 eval mode on ``device``. Feed a volume with ``volume_to_inputs(processor, volume, prompt,
    family="qwen3_vl", resolution=tiny_vqa_resolution(version))`` where ``prompt`` is a
    :class:`medpruner.synthetic.VQASample`'s ``question`` of task ``version``
    (``medpruner.synthetic.task_module(version)``)."""
    weights = tiny_vqa_weights(version)
    if not weights.is_file():
        how = ("package data missing" if version == 1 else
               "not trained into this copy: python scripts/train_tiny_vqa.py --version 2 --out "
               f"{TINY_VQA_V2_DIR} --record {TINY_VQA_V2_DIR / 'training.json'}")
        raise FileNotFoundError(f"tiny VQA v{version} weights not found at {weights} ({how})")
    processor = tiny_vqa_processor(version=version)
    model = load_weights(build_tiny_vqa(processor.tokenizer, version=version), weights)
    return model.to(device), processor
