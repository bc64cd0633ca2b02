"""Shipped checkpoints. ``tiny_vqa``: a small Qwen3-VL trained offline on the synthetic 3D VQA task
of :mod:`medpruner.synthetic` by ``scripts/train_tiny_vqa.py`` (a synthetic sanity benchmark, not a
clinical model). The weights are package data (``tiny_vqa/model.safetensors``); the byte-level
tokenizer and the image processor are rebuilt from code, so nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

TINY_VQA_DIR = Path(__file__).resolve().parent / "tiny_vqa"
TINY_VQA_WEIGHTS = TINY_VQA_DIR / "model.safetensors"
# Slices are resized to this side before the processor: 16-pixel patches merged 2 x 2 give 2 x 2 = 4
# visual tokens per slice.
TINY_VQA_RESOLUTION = 64
TINY_VQA_PATCH = 16


def tiny_vqa_processor(padding_side: str = "left"):
    """The checkpoint's processor: byte-level tokenizer and 16-pixel-patch image processor."""
    from transformers import Qwen3VLProcessor

    from medpruner._tiny import image_only_processor, qwen_image_processor, qwen_tokenizer

    image_processor = qwen_image_processor(TINY_VQA_PATCH, max_merged_patches=64)
    return image_only_processor(Qwen3VLProcessor, image_processor, qwen_tokenizer(padding_side))


def tiny_vqa_config(tokenizer):
    """The checkpoint's architecture: the tiny Qwen3-VL of :mod:`medpruner._tiny` widened to a text
    width of 128 (4 heads of dim 32: vLLM's CPU attention takes 32, 64 or 80), 2 text layers, a vision
    tower of width 64 (2 heads of dim 32) and 16-pixel patches."""
    from medpruner._tiny import tiny_qwen3_vl_config

    return tiny_qwen3_vl_config(
        tokenizer,
        patch_size=TINY_VQA_PATCH,
        max_position_embeddings=4096,
        vision_width=64,
        text_width=128,
        head_dim=32,
        tie_word_embeddings=True,
    )


def build_tiny_vqa(tokenizer, *, seed: int = 0):
    """The untrained model of :func:`tiny_vqa_config`, initialised after ``torch.manual_seed(seed)``
    (the global RNG state is put back afterwards), in eval mode, with greedy generation that stops at
    ``<|im_end|>``."""
    from medpruner._tiny import tiny_qwen3_vl_model

    return tiny_qwen3_vl_model(tokenizer, seed=seed, config=tiny_vqa_config(tokenizer))


def load_tiny_vqa(device="cpu"):
    """The shipped synthetic-VQA checkpoint and its processor, offline: ``(model, processor)``, the
    model in float32 eval mode on ``device``. Feed a volume with
    ``volume_to_inputs(processor, volume, prompt, family="qwen3_vl", resolution=TINY_VQA_RESOLUTION)``
    where ``prompt`` is a :class:`medpruner.synthetic.VQASample`'s ``question``."""
    from safetensors.torch import load_file

    if not TINY_VQA_WEIGHTS.is_file():
        raise FileNotFoundError(f"tiny VQA weights not found at {TINY_VQA_WEIGHTS} (package data missing)")
    processor = tiny_vqa_processor()
    model = build_tiny_vqa(processor.tokenizer)
    state = {name: tensor.float() for name, tensor in load_file(str(TINY_VQA_WEIGHTS)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied output weights are not stored; anything else missing or extra means a mismatched file.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"tiny VQA weights do not match the architecture: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tie_weights()
    return model.to(device).eval(), processor
