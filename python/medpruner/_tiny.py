"""The tiny random-weight Qwen3-VL that ``medpruner demo`` runs, and the pieces the tests share with it:
a byte-level tokenizer (one token per byte, no merges) with the Qwen-VL special tokens, a PIL image
processor, a processor that accepts ``video_processor=None`` and the model built from a config. No
download, no torchvision."""

from __future__ import annotations

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def byte_vocab() -> dict[str, int]:
    """The 256 byte-level symbols of GPT-2 style BPE, each its own token."""
    from tokenizers.pre_tokenizers import ByteLevel

    return {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}


def qwen_tokenizer(padding_side: str | None = None):
    """A Qwen2 tokenizer over :func:`byte_vocab` plus :data:`QWEN_SPECIALS`, padded with
    ``<|endoftext|>``; ``padding_side`` is left at the class default when None."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=byte_vocab(), merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tokenizer.pad_token = "<|endoftext|>"
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def qwen_image_processor(
    patch_size: int = 8, *, max_merged_patches: int = 1024, image_mean=None, image_std=None
):
    """The PIL Qwen2-VL image processor (merge 2, temporal patch 2): at least one and at most
    ``max_merged_patches`` merged patches per image, normalised with mean and std 0.5 unless given."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    merged = (2 * patch_size) ** 2
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": merged, "longest_edge": merged * max_merged_patches},
        image_mean=[0.5] * 3 if image_mean is None else image_mean,
        image_std=[0.5] * 3 if image_std is None else image_std,
    )


def image_only_processor(processor_class, image_processor, tokenizer):
    """A Qwen-VL processor that accepts ``video_processor=None``: the video processor class needs
    torchvision, which slices never use."""

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = processor_class.__name__
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


def tiny_qwen3_vl_config(
    tokenizer,
    *,
    patch_size: int = 8,
    max_position_embeddings: int = 32768,
    vision_width: int = 32,
    text_width: int = 64,
    head_dim: int = 16,
    tie_word_embeddings: bool | None = None,
):
    """A two-layer Qwen3-VL config (vision width 32, text width 64 with 4 query heads of ``head_dim``,
    deepstack at layer 0, interleaved MRoPE over the head dim) whose vocabulary and special token ids are
    ``tokenizer``'s; attention is sdpa. The widths scale for the trained checkpoint; MLPs are twice as
    wide as their stream. ``tie_word_embeddings`` None keeps the config class default."""
    from transformers import Qwen3VLConfig

    token = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    rotary_half = head_dim // 2
    tied = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    config = Qwen3VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_heads=2,
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text_width,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=head_dim,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [rotary_half // 2, rotary_half // 4, rotary_half // 4],
                "mrope_interleaved": True,
            },
            pad_token_id=token["<|endoftext|>"],
        ),
        image_token_id=token["<|image_pad|>"],
        video_token_id=token["<|video_pad|>"],
        vision_start_token_id=token["<|vision_start|>"],
        vision_end_token_id=token["<|vision_end|>"],
        **tied,
    )
    config._attn_implementation = "sdpa"
    return config


def tiny_qwen3_vl_model(
    tokenizer,
    *,
    seed: int = 0,
    device=None,
    patch_size: int = 8,
    max_position_embeddings: int = 32768,
    restore_rng: bool = True,
    config=None,
):
    """The random-weight model of :func:`tiny_qwen3_vl_config` (or of ``config``), initialised after
    ``torch.manual_seed(seed)``, in eval mode, on ``device`` when given, with greedy generation that
    pads with ``<|endoftext|>`` and stops at ``<|im_end|>``. With ``restore_rng`` the global torch RNG
    state is put back afterwards; without it, it is left where the initialisation ended."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    if config is None:
        config = tiny_qwen3_vl_config(
            tokenizer, patch_size=patch_size, max_position_embeddings=max_position_embeddings
        )
    generator_state = torch.random.get_rng_state() if restore_rng else None
    torch.manual_seed(seed)
    try:
        model = Qwen3VLForConditionalGeneration(config).eval()
        if device is not None:
            model = model.to(device)
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    return model
