"""Host reads and sync-free sequence surgery for the pruning pipeline (:mod:`medpruner.adapters.base`):
the one device-to-host read (:func:`host_read`) and pinned copies back (:func:`to_device`), the index
and offset helpers, the packaging of kept encoder outputs per image, and the repacking of token
sequences around the pruned images with each row's padding side kept."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medpruner_kernels._validation import raise_pending_errors


def host_read(*tensors: torch.Tensor, last: bool = False) -> list[list[int]]:
    """The one place the pipeline reads device values: every tensor (integer or bool, any shape) in a
    single device-to-host copy, returned as flat Python lists. ``last=True`` marks a request's final
    read, where the checks the kernels deferred (CUDA, or ``deferred_checks``) are raised. Float
    tensors come back as Python floats (exact for float32 and float64)."""
    # Floats travel as the int64 bits of their float64 value, in the same copy, and come back as floats.
    flat = [t.reshape(-1).double().view(torch.long) if t.is_floating_point() else t.reshape(-1).to(torch.long)
            for t in tensors]
    values = torch.cat(flat).tolist()
    if last:
        raise_pending_errors()
    out, start = [], 0
    for t, source in zip(flat, tensors, strict=True):
        chunk = values[start : start + t.numel()]
        out.append(torch.tensor(chunk, dtype=torch.long).view(torch.float64).tolist()
                   if source.is_floating_point() else chunk)
        start += t.numel()
    return out


def to_device(values, device, dtype=torch.long) -> torch.Tensor:
    """A host list as a tensor on ``device``: pinned and ``non_blocking`` when the target is CUDA."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def compact_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D ``mask``, given their ``count`` (already on the host), with
    no host sync (``torch.nonzero_static``: the output size is ``count``, not read from the device)."""
    return torch.nonzero_static(mask, size=count).flatten()


def per_image_outputs(output, kept_counts: list[int]):
    """The packaged encoder output with one ``pooler_output`` entry per image of the request, as the
    unpatched model's own encoder output has: generate's beam search and ``num_return_sequences``
    repeat those entries per request, by counting each entry's tokens against each row's placeholders.

    A tuple of features (Qwen) becomes one tensor per image (empty for a slice IAF dropped), and the
    deepstack levels alike; a flat ``[N, D]`` tensor (Gemma3, whose forward wants one tensor) becomes
    ``[images, n, D]`` when every image kept the same n tokens (the unpatched shape at identity
    settings), else ``[N, 1, D]``: one entry per token, which splits at every row boundary."""
    features = output.pooler_output
    if isinstance(features, torch.Tensor):
        counts = set(kept_counts)
        if len(counts) == 1 and 0 not in counts:
            output.pooler_output = features.reshape(len(kept_counts), kept_counts[0], features.shape[-1])
        else:
            output.pooler_output = features.reshape(features.shape[0], 1, features.shape[-1])
        return output
    output.pooler_output = torch.cat(tuple(features)).split(kept_counts)
    side = getattr(output, "deepstack_features", None)
    if side is not None:
        output.deepstack_features = [torch.cat(tuple(level)).split(kept_counts) for level in side]
    return output


def repack_sequences(
    keep: torch.Tensor,
    length: int,
    tensors: dict[str, tuple[torch.Tensor, int]],
    right: torch.Tensor | bool = False,
) -> dict[str, torch.Tensor]:
    """The kept positions of each row, in order, aligned to the right end of ``length`` columns (to the
    left end where ``right``: a right-padded batch), without host syncs. A row with more kept positions
    than ``length`` loses those farthest from that end (its own padding, see :func:`row_span`); one
    with fewer is filled at the other end.

    keep: bool ``[B, L]`` (the positions to keep); length: the host row length; tensors: name ->
    (tensor whose last two dims are ``[B, L]``, fill value); right: a bool (or 0-d bool tensor) for the
    whole batch. Returns the repacked tensors (the caller repacks its attention mask with them, so a
    kept masked position stays masked).
    """
    batch, seq = keep.shape
    rank = torch.cumsum(keep, dim=1) - 1
    shift = torch.where(torch.as_tensor(right, device=keep.device), 0, length - keep.sum(1))
    column = shift.unsqueeze(1) + rank
    placed = keep & (column >= 0) & (column < length)
    row = torch.arange(batch, device=keep.device).unsqueeze(1) * (length + 1)
    slot = torch.where(placed, row + column, row + length).reshape(-1)
    out = {}
    for name, (tensor, fill) in tensors.items():
        lead = tensor.shape[:-2]
        flat = tensor.reshape(*lead, batch * seq)
        target = torch.full((*lead, batch * (length + 1)), fill, dtype=tensor.dtype, device=tensor.device)
        target.scatter_(-1, slot.expand(*lead, -1), flat)
        out[name] = target.reshape(*lead, batch, length + 1)[..., :length]
    return out


def block_scores(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, unit: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DINS inputs of one tower call whose merged tokens are ``unit`` consecutive patches: the
    attention each merged token receives (``attention_importance`` with ``group=unit``) and its key,
    the float32 mean over heads and over its patches. q, k: ``[N, H, Dh]`` (post-RoPE)."""
    from medpruner_kernels import attention_importance

    scores = attention_importance(q, k, cu_seqlens=cu_seqlens, scale=scale, group=unit, backend=backend)
    keys = k.float().mean(dim=1).reshape(k.shape[0] // unit, unit, -1).mean(dim=1)
    return scores, keys


def recorded_tokens(scores: torch.Tensor, keep: torch.Tensor, config) -> dict[str, torch.Tensor | None]:
    """The PruneStats token fields: CPU copies of the DINS scores and final keep mask when the config
    asks for them (two device-to-host copies, after the request's last read), nothing otherwise."""
    if not config.record_tokens:
        return {"token_scores": None, "token_keep": None}
    return {"token_scores": scores.detach().float().cpu(), "token_keep": keep.detach().cpu()}


def host_offsets(lengths: list[int]) -> list[int]:
    """``[0, l0, l0 + l1, ...]``: running offsets of host lengths."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return offsets


def count_ranges(counts: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive groups of the given sizes."""
    offsets = host_offsets(counts)
    return list(zip(offsets[:-1], offsets[1:], strict=True))


def range_index(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    """Concatenated aranges of host ranges, built on the host and copied (pinned, no sync)."""
    parts = [torch.arange(start, end) for start, end in ranges]
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return to_device(flat, device)


def pad_token_id(cfg) -> int:
    """The model's pad token id (top-level or text config), 0 when it has none."""
    for source in (cfg, getattr(cfg, "text_config", None)):
        value = getattr(source, "pad_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    return 0


def padded_right(valid: torch.Tensor) -> torch.Tensor:
    """0-d bool, on the device: the batch is right-padded (some row ends with padding, none starts
    with it). A batch without padding counts as left-padded, as ``generate`` wants it."""
    return valid[:, 0].all() & ~valid[:, -1].all()


def row_span(anchor: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the part of each row the pruned row must hold, from its first ``anchor``
    (a valid token or an image placeholder) on, or up to its last one where ``right``. What lies
    outside (the row's padding on the batch's padding side) fills the row as far as the longest row
    leaves room, so the batch keeps no column that is padding in every row."""
    after_first = torch.cumsum(anchor, dim=1) > 0
    up_to_last = torch.flip(torch.cumsum(torch.flip(anchor, dims=(1,)), dim=1) > 0, dims=(1,))
    return torch.where(right, up_to_last, after_first)


def caller_positions(call: dict[str, Any]) -> torch.Tensor | None:
    """The caller's ``position_ids`` (``[..., B, L]``) with one row per batch row (a shared ``[1, L]``
    or ``[..., 1, L]`` numbering is expanded), or None."""
    given = call.get("position_ids")
    if given is None:
        return None
    input_ids = call["input_ids"]
    if given.shape[-1] != input_ids.shape[1]:
        raise ValueError(
            f"position_ids must end with the sequence length of input_ids {tuple(input_ids.shape)} to be "
            f"pruned with the sequence, got {tuple(given.shape)}"
        )
    return given.expand(*given.shape[:-2], input_ids.shape[0], input_ids.shape[1])


def image_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int):
    """(valid, is_image, run_start) ``[B, L]`` bool masks: the non-padding positions, the image
    placeholders (under attention_mask == 0 too), and the first placeholder of each image's run."""
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    # The model fills every placeholder, masked or not, with the images' features in order.
    is_image = input_ids == image_token_id
    run_start = is_image & ~F.pad(is_image[:, :-1], (1, 0), value=False)
    return valid, is_image, run_start
