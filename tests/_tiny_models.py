"""Tiny random-weight models and local processors of each family, built from configs (no hub access).

The tokenizers are byte-level BPE vocabularies without merges (one token per byte) plus the family's
special tokens; the image processors are the PIL backends, so neither torchvision nor downloads are
needed. The test processors accept ``video_processor=None``: the video processor class needs torchvision,
which these tests do not install.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from medpruner import _tiny
from medpruner._tiny import QWEN_SPECIALS
from medpruner._tiny import byte_vocab as _byte_vocab

from medpruner_kernels import reference


def qwen_tokenizer():
    return _tiny.qwen_tokenizer(padding_side="left")


def qwen_processor(family: str = "qwen3_vl", *, patch_size: int = 8, clip_norm: bool = False):
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as processor_class
    else:
        from transformers import Qwen2_5_VLProcessor as processor_class
    mean, std = (
        ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
        if clip_norm
        else (
            [0.5] * 3,
            [0.5] * 3,
        )
    )
    image_processor = _tiny.qwen_image_processor(
        patch_size, max_merged_patches=64, image_mean=mean, image_std=std
    )
    return _tiny.image_only_processor(processor_class, image_processor, qwen_tokenizer())


def tiny_qwen3_vl(seed: int = 0):
    # the tests seed the global torch RNG and leave it there (restore_rng=False), as they always have
    return _tiny.tiny_qwen3_vl_model(
        qwen_tokenizer(), seed=seed, max_position_embeddings=4096, restore_rng=False
    )


def synthetic_volume(depth: int, size: int = 64, *, seed: int = 0, repeat_every: int = 2) -> torch.Tensor:
    """``[depth, size, size]`` in [0, 1]: smooth random slices where every ``repeat_every``-th slice
    nearly repeats the previous one, so IAF has near-duplicates to drop at the paper's gamma."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(depth, 1, size // 8, size // 8, generator=generator)
    slices = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]
    for s in range(1, depth):
        if s % repeat_every == 0:
            slices[s] = slices[s - 1] + 0.002 * torch.rand(size, size, generator=generator)
    return slices.clamp(0, 1)


def qwen_volume_inputs(processor, volumes: list[torch.Tensor], prompt: str = "Describe."):
    """Processor inputs for a batch: one row per volume, one image per slice, left padding."""
    texts, images = [], []
    for volume in volumes:
        texts.append(
            "<|im_start|>user\n"
            + "<|vision_start|><|image_pad|><|vision_end|>" * volume.shape[0]
            + prompt
            + "<|im_end|>\n<|im_start|>assistant\n"
        )
        images.append([np.repeat(s.numpy()[:, :, None], 3, axis=2) for s in volume])
    return processor(
        text=texts, images=images, return_tensors="pt", padding=True, images_kwargs={"do_rescale": False}
    )


# ------------------------------------------------------------------------------- independent oracle
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def paper_scale_pixels(model, pixel_values, num_images):
    """``[num_images, -1]`` float64 pixels on the paper's [-1, 1] scale: Qwen2.5-VL's processor divides
    by the CLIP std (per channel, channel-major patch rows), the others by 0.5 already."""
    rows = pixel_values.double()
    if type(model).__name__.startswith("Qwen2_5"):
        std = torch.tensor(CLIP_STD, dtype=torch.float64)
        rows = (rows.reshape(rows.shape[0], 3, -1) * std.view(1, 3, 1) / 0.5).reshape(rows.shape)
    return rows.reshape(num_images, -1)


def qwen_expected_pruned(
    model, inputs, *, gamma, tau, merge, mode, temperature=2.0, context_frac=0.05, window_order=None
):
    """Prune with the float64 references and plain Python loops over the token lists, independently of
    the adapter, and return the unpatched model's call on the pruned inputs."""
    inner, cfg = model.model, model.config
    visual = inner.visual
    grid = inputs["image_grid_thw"]
    tokens = (grid.prod(-1) // 4).tolist()
    ids = inputs["input_ids"].tolist()
    mask = inputs["attention_mask"].tolist()
    images_per_row = []
    for row, row_mask in zip(ids, mask, strict=True):
        runs = sum(
            1
            for j, (t, m) in enumerate(zip(row, row_mask, strict=True))
            if m and t == cfg.image_token_id and (j == 0 or row[j - 1] != cfg.image_token_id)
        )
        images_per_row.append(runs)
    cu_vol = torch.tensor([0] + torch.tensor(images_per_row).cumsum(0).tolist())
    num_images = grid.shape[0]
    slice_keep, _ = reference.iaf_select(paper_scale_pixels(model, inputs["pixel_values"], num_images), gamma, cu_vol)

    captured = {}
    attn = visual.blocks[-1].attn

    def hook(module, args, kwargs):
        captured["x"], captured["rope"], captured["cu"] = (
            args[0],
            kwargs["position_embeddings"],
            kwargs["cu_seqlens"],
        )

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        features = inner.get_image_features(inputs["pixel_values"], grid, return_dict=True)
    handle.remove()
    pooled = torch.cat(features.pooler_output)
    deep = [torch.cat(level) for level in getattr(features, "deepstack_features", None) or []]
    n = captured["x"].shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(captured["x"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, *captured["rope"])
    scores = reference.attention_importance(q, k, captured["cu"], scale=attn.scaling, group=4)
    keys = k.double().mean(1).reshape(-1, 4, k.shape[-1]).mean(1)
    if window_order is not None:
        inverse = torch.argsort(window_order(visual, grid))
        scores, keys = scores[inverse], keys[inverse]
    cu_tok = torch.tensor([0] + torch.tensor(tokens).cumsum(0).tolist())
    tau_t = torch.full((num_images,), float(tau), dtype=torch.float64)
    keep = reference.nucleus_select(scores, tau_t, cu_tok, temperature=temperature, min_keep=1)
    slice_of_token = slice_keep.repeat_interleave(torch.tensor(tokens))
    x = pooled.double()
    if merge:
        x, keep = reference.merge_tokens(pooled, keys, keep, cu_tok, context_frac=context_frac)
    if mode == "paper":
        first = torch.zeros_like(keep)
        first[cu_tok[:-1]] = True
        keep = torch.where(slice_of_token, keep, first)
    else:
        keep = keep & slice_of_token

    with torch.no_grad():
        positions, _ = inner.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=grid,
            attention_mask=inputs["attention_mask"],
        )
    keep_list = keep.tolist()
    slice_list = slice_keep.tolist()
    token_counter = 0
    rows = []
    for b, (row, row_mask) in enumerate(zip(ids, mask, strict=True)):
        kept_positions = []
        for j, t in enumerate(row):
            if not row_mask[j]:
                continue
            if t == cfg.image_token_id:
                if keep_list[token_counter]:
                    kept_positions.append(j)
                token_counter += 1
            else:
                kept_positions.append(j)
        if mode == "fast":
            # a dropped slice loses its <|vision_start|> ... <|vision_end|> wrapper as well
            image_index = sum(images_per_row[:b]) - 1
            drop = set()
            for j, t in enumerate(row):
                if row_mask[j] and t == cfg.vision_start_token_id:
                    image_index += 1
                    if not slice_list[image_index]:
                        drop.add(j)
                        end = j + 1
                        while row[end] != cfg.vision_end_token_id:
                            end += 1
                        drop.add(end)
            kept_positions = [j for j in kept_positions if j not in drop]
        rows.append(kept_positions)
    length = max(len(r) for r in rows)
    batch = len(rows)
    new_ids = torch.full((batch, length), 0, dtype=torch.long)
    new_mask = torch.zeros((batch, length), dtype=torch.long)
    new_types = torch.zeros((batch, length), dtype=torch.long)
    new_pos = torch.zeros((4, batch, length), dtype=torch.long)
    for b, kept_positions in enumerate(rows):
        pad = length - len(kept_positions)
        index = torch.tensor(kept_positions)
        new_ids[b, pad:] = inputs["input_ids"][b, index]
        new_mask[b, pad:] = 1
        new_types[b, pad:] = inputs["mm_token_type_ids"][b, index]
        new_pos[0, b, pad:] = torch.arange(len(kept_positions))
        new_pos[1:, b, pad:] = positions[:, b, index]
    index = keep.nonzero().flatten()
    output_class = type(features)
    kept = (x[index].to(pooled.dtype),)
    if deep:
        encoded = output_class(pooler_output=kept, deepstack_features=[(d[index],) for d in deep])
    else:
        encoded = output_class(pooler_output=kept)
    call = dict(
        input_ids=new_ids,
        attention_mask=new_mask,
        mm_token_type_ids=new_types,
        position_ids=new_pos,
        mm_encoder_outputs={"image": encoded},
    )
    return call, new_mask.bool()


def tiny_qwen2_5_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.do_sample = False
    return model


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def gemma_tokenizer():
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(
        vocab=_byte_vocab(), merges=[], unk_token="<pad>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": GEMMA_SPECIALS})
    tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token = GEMMA_SPECIALS[3:]
    tokenizer.boi_token_id = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
    tokenizer.image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    tokenizer.padding_side = "left"
    return tokenizer


def gemma_processor():
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_processor = Gemma3ImageProcessorPil(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False
    )
    return Gemma3Processor(image_processor=image_processor, tokenizer=gemma_tokenizer(), image_seq_length=16)


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = gemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS}
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=512,
            max_position_embeddings=4096,
            pad_token_id=ids["<pad>"],
            eos_token_id=ids["<eos>"],
            bos_token_id=ids["<bos>"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=4,
        ),
        mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # The projector weight starts at zero; random values make the visual tokens matter in the tests.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["<eos>"]
    model.generation_config.do_sample = False
    return model


def gemma_volume_inputs(processor, volumes: list[torch.Tensor], prompt: str = "Describe."):
    """One row per volume, each slice as "SLICE i: <start_of_image>", left padding."""
    texts, images = [], []
    for volume in volumes:
        slices = "".join(f"SLICE {i + 1}: <start_of_image>" for i in range(volume.shape[0]))
        texts.append("<bos>" + slices + prompt)
        images.append([np.repeat(s.numpy()[:, :, None], 3, axis=2) for s in volume])
    return processor(
        text=texts, images=images, return_tensors="pt", padding=True, images_kwargs={"do_rescale": False}
    )


def gemma_expected_pruned(model, inputs, *, gamma, tau, merge, mode, temperature=2.0, context_frac=0.05):
    """The Gemma3 counterpart of :func:`qwen_expected_pruned`: float64 references, the projector's 4x4
    blocks pooled by reshaping (not avg_pool2d), and Python loops over the token lists. Returns the
    unpatched model's call on the pruned inputs and the mask of its valid positions."""
    inner, cfg = model.model, model.config
    projector = inner.multi_modal_projector
    side, kernel = projector.patches_per_image, projector.kernel_size
    per_image = cfg.mm_tokens_per_image
    pixel_values = inputs["pixel_values"]
    num_images = pixel_values.shape[0]
    ids = inputs["input_ids"].tolist()
    mask = inputs["attention_mask"].tolist()
    images_per_row = [
        sum(1 for t, m in zip(row, row_mask, strict=True) if m and t == cfg.boi_token_id)
        for row, row_mask in zip(ids, mask, strict=True)
    ]
    cu_vol = torch.tensor([0] + torch.tensor(images_per_row).cumsum(0).tolist())
    slice_keep, _ = reference.iaf_select(pixel_values.reshape(num_images, -1), gamma, cu_vol)

    tower = inner.vision_tower
    encoder = getattr(tower, "encoder", None) or tower.vision_model.encoder
    attn = encoder.layers[-1].self_attn
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        features = inner.get_image_features(pixel_values, return_dict=True)
    handle.remove()
    pooled = features.pooler_output.reshape(num_images * per_image, -1)
    x = captured["x"]
    patches = x.shape[1]
    with torch.no_grad():
        q = attn.q_proj(x).reshape(num_images * patches, attn.num_heads, -1)
        k = attn.k_proj(x).reshape(num_images * patches, attn.num_heads, -1)
    cu_patch = torch.arange(num_images + 1) * patches
    received = reference.attention_importance(q, k, cu_patch, scale=attn.scale)
    blocks = side // kernel

    def pool_blocks(values):
        grid = values.reshape(num_images, blocks, kernel, blocks, kernel, -1)
        return grid.mean(dim=(2, 4)).reshape(num_images * blocks * blocks, -1)

    if mode == "paper":
        # the published code's raster strips of kernel**2 consecutive patches (docs/PAPER_MODE.md)
        scores = received.reshape(-1, kernel * kernel).mean(1)
        keys = k.double().mean(1).reshape(-1, kernel * kernel, k.shape[-1]).mean(1)
    else:
        scores = pool_blocks(received).flatten()
        keys = pool_blocks(k.double().mean(1))
    cu_tok = torch.arange(num_images + 1) * per_image
    tau_t = torch.full((num_images,), float(tau), dtype=torch.float64)
    keep = reference.nucleus_select(scores, tau_t, cu_tok, temperature=temperature, min_keep=1)
    slice_of_token = slice_keep.repeat_interleave(per_image)
    merged = pooled.double()
    if merge:
        merged, keep = reference.merge_tokens(pooled, keys, keep, cu_tok, context_frac=context_frac)
    if mode == "paper":
        first = torch.zeros_like(keep)
        first[cu_tok[:-1]] = True
        keep = torch.where(slice_of_token, keep, first)
    else:
        keep = keep & slice_of_token

    keep_list = keep.tolist()
    slice_list = slice_keep.tolist()
    token_counter = 0
    image_index = -1
    rows = []
    for row, row_mask in zip(ids, mask, strict=True):
        kept_positions = []
        for j, t in enumerate(row):
            if not row_mask[j]:
                continue
            if t == cfg.boi_token_id:
                image_index += 1
            dropped_slice = mode == "fast" and image_index >= 0 and not slice_list[image_index]
            if t == cfg.image_token_id:
                if keep_list[token_counter]:
                    kept_positions.append(j)
                token_counter += 1
            elif t in (cfg.boi_token_id, cfg.eoi_token_id) and dropped_slice:
                continue
            else:
                kept_positions.append(j)
        rows.append(kept_positions)
    length = max(len(r) for r in rows)
    batch = len(rows)
    new_ids = torch.full((batch, length), cfg.text_config.pad_token_id, dtype=torch.long)
    new_mask = torch.zeros((batch, length), dtype=torch.long)
    new_types = torch.zeros((batch, length), dtype=torch.long)
    for b, kept_positions in enumerate(rows):
        pad = length - len(kept_positions)
        index = torch.tensor(kept_positions)
        new_ids[b, pad:] = inputs["input_ids"][b, index]
        new_mask[b, pad:] = 1
        new_types[b, pad:] = inputs["token_type_ids"][b, index]
    index = keep.nonzero().flatten()
    encoded = type(features)(pooler_output=merged[index].to(pooled.dtype))
    call = dict(
        input_ids=new_ids,
        attention_mask=new_mask,
        token_type_ids=new_types,
        mm_encoder_outputs={"image": encoded},
    )
    return call, new_mask.bool()


def gemma_processor_with(*, image_seq_length: int):
    """:func:`gemma_processor` emitting ``image_seq_length`` placeholders per image."""
    processor = gemma_processor()
    from transformers import Gemma3Processor

    return Gemma3Processor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, image_seq_length=image_seq_length
    )


def tiny_gemma3_non_square(seed: int = 0):
    """:func:`tiny_gemma3` with ``mm_tokens_per_image = 10``: the projector pools to int(sqrt(10)) = 3
    tokens a side, so each image has 9 LLM tokens (the model's rule, not the config's number)."""
    import copy

    from transformers import Gemma3ForConditionalGeneration

    config = copy.deepcopy(tiny_gemma3(seed).config)
    config.mm_tokens_per_image = 10
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.generation_config = tiny_gemma3(seed).generation_config
    return model
