"""Train the shipped tiny VQA checkpoint on the synthetic 3D VQA task, deterministically, on CPU.

    nice -n 19 python scripts/train_tiny_vqa.py --out python/medpruner/checkpoints/tiny_vqa_v2 \
        --record python/medpruner/checkpoints/tiny_vqa_v2/training.json --steps 2000

``--version 2`` (the default) is the CT-like task of :mod:`medpruner.synthetic.ct` at 64-pixel slices
with 8-pixel patches (16 visual tokens per slice); ``--version 1 --steps 2500`` is the task of
:mod:`medpruner.synthetic.task` at 64 pixels with 16-pixel patches (4 tokens per slice), which made
``checkpoints/tiny_vqa`` and ``bench/results/tiny-vqa-training-2026-11-29.json``.

Each group of 4 steps holds the next 4 x batch train volumes sorted by depth (every volume is seen once), one
question each (its type drawn uniformly among the types the volume can answer). The loss is the
cross-entropy of the answer tokens and the closing ``<|im_end|>`` only, plus (weight 1) a training-only
linear probe on the merged visual tokens that predicts the lesion class under each token; the first
VISION_STEPS[version] steps train the vision tower and the probe alone. AdamW with a linear warm-up to a
constant rate (restarted at the joint stage, at half the rate). The validation accuracy (greedy first
answer token) on fixed validation questions is logged along the curve; the test accuracy of the final
weights, per question type, against chance, goes to the record.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch
from medpruner.checkpoints import build_tiny_vqa, load_weights, tiny_vqa_patch, tiny_vqa_processor, tiny_vqa_resolution
from medpruner.synthetic import task_module

SEED = 0
AUX_WEIGHT = 1.0
# Joint training from scratch settles on each question type's prior answer and the vision tower then
# stops learning lesion features, so the first steps train the vision tower alone on the token probe.
# v2's small findings need a long vision stage: after 60 vision steps every v2 question but class stayed
# at its majority answer through 2400 joint steps (bench/results/tiny-vqa-v2-attempt-2026-12-07.json);
# after 2500 the calcification question is learned (bench/results/tiny-vqa-v2-attempt-2-2026-12-07.json).
VISION_STEPS = {1: 100, 2: 2500}
JOINT_LR_SCALE = 0.5
END = "<|im_end|>"


GROUP = 4


class Setup(NamedTuple):
    """What a task version trains: its generator module, slice side, patch size, model and processor."""

    version: int
    task: ModuleType
    resolution: int
    patch: int

    @property
    def tokens_per_side(self) -> int:
        return self.resolution // (self.patch * 2)

    @property
    def probe_classes(self) -> int:
        """Background, each lesion class, and v2's calcification."""
        return 1 + len(self.task.LESION_CLASSES) + (self.version >= 2)

    def processor(self):
        return tiny_vqa_processor(version=self.version)

    def build(self, tokenizer, seed: int = SEED):
        return build_tiny_vqa(tokenizer, seed=seed, version=self.version)

    def load(self, weights: Path):
        """``(model, processor)`` from saved weights."""
        processor = self.processor()
        return load_weights(self.build(processor.tokenizer), weights), processor


def setup_for(version: int) -> Setup:
    return Setup(version, task_module(version), tiny_vqa_resolution(version), tiny_vqa_patch(version))


def step_samples(step: int, batch_size: int, cache: dict, setup: Setup) -> list:
    """The rows of training step ``step`` (each a list of questions about one volume, see
    :func:`training_sample`): the ``GROUP`` steps of a group share its ``GROUP * batch_size`` volumes,
    sorted by depth so that a batch pads little."""
    group = step // GROUP
    if cache.get("group") != group:
        first = group * GROUP * batch_size
        rows = [training_sample(i, setup) for i in range(first, first + GROUP * batch_size)]
        cache.update(group=group, samples=sorted(rows, key=lambda r: (r[0].volume.depth, r[0].sample_id)))
    offset = (step % GROUP) * batch_size
    return cache["samples"][offset:offset + batch_size]


def training_sample(index: int, setup: Setup) -> list:
    """The questions of train row ``index``, about train volume ``index``. v1: one question, its type
    drawn uniformly among the applicable ones by a stream keyed on the index. v2: every applicable
    question, in an order drawn by a stream keyed on (version, index), asked one after the other
    (multi-turn, as LLaVA-style VQA training does): the first is a uniformly drawn type in exactly
    the single-question format the model is evaluated on, the others reuse the same visual tokens,
    so a step supervises ~3.8 answers per volume for ~1.3 times the compute of one."""
    candidates = setup.task.questions_for(setup.task.generate_volume("train", index))
    if setup.version == 1:
        choice = np.random.default_rng([7, index]).integers(len(candidates))
        return [candidates[int(choice)]]
    order = np.random.default_rng([7, setup.version, index]).permutation(len(candidates))
    return [candidates[int(i)] for i in order]


def encode(processor, volume, prompt: str, resolution: int) -> dict:
    """What ``volume_to_inputs(processor, volume, prompt, family="qwen3_vl", resolution=resolution)``
    returns (tests/test_checkpoint.py checks that), built with torch ops: the PIL processor takes
    seconds per volume, longer than a training step."""
    image_processor, tokenizer = processor.image_processor, processor.tokenizer
    patch, merge, temporal = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    slices = torch.nn.functional.interpolate(torch.as_tensor(volume, dtype=torch.float32)[:, None],
                                             size=(resolution, resolution), mode="bilinear",
                                             align_corners=False, antialias=True).clamp(0.0, 1.0)
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    # The PIL processor stores the slices as 8-bit images: floor to 1/255 as it does.
    slices = torch.floor(slices * 255.0) / 255.0
    images = (slices.expand(-1, 3, -1, -1) - mean) / std
    depth, grid = images.shape[0], resolution // patch
    blocks = grid // merge
    patches = images.reshape(depth, 3, blocks, merge, patch, blocks, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)
    patches = patches[:, :, :, :, :, :, None].expand(*patches.shape[:6], temporal, patch, patch)
    pixel_values = patches.reshape(depth * grid * grid, 3 * temporal * patch * patch)
    tokens_per_slice = grid * grid // (merge * merge)
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])
    slice_ids = [ids[0]] + [ids[1]] * tokens_per_slice + [ids[2]]
    input_ids = torch.tensor([slice_ids * depth + tokenizer(prompt)["input_ids"]])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == ids[1]).long(), "pixel_values": pixel_values,
            "image_grid_thw": torch.tensor([[1, grid, grid]] * depth)}


def collate(processor, samples, *, with_answers: bool, resolution: int):
    """One batch: per row (a sample, or a list of samples about one volume: turns) the :func:`encode`
    of its question(s), each followed by its answer and ``<|im_end|>`` when ``with_answers`` (without
    answers a row is one question), left-padded so every row ends at the last column; labels on the
    answer tokens only."""
    tokenizer = processor.tokenizer
    encoded, answer_spans = [], []
    for row in samples:
        turns = list(row) if isinstance(row, (list, tuple)) else [row]
        if not with_answers:
            if len(turns) != 1:
                raise ValueError("without answers a row is one question")
            encoded.append(encode(processor, turns[0].volume.data, turns[0].question, resolution))
            answer_spans.append([])
            continue
        pieces = [text for turn in turns for text in (turn.question, turn.answer + END)]
        encoded.append(encode(processor, turns[0].volume.data, "".join(pieces), resolution))
        # (offset from the end, length) of each answer: the byte-level tokenizer has no merges, so the
        # pieces tokenise to the same ids alone as joined.
        lengths = [len(tokenizer(text)["input_ids"]) for text in pieces]
        ends = np.cumsum(lengths[::-1])[::-1]
        answer_spans.append([(int(ends[i]), lengths[i]) for i in range(1, len(pieces), 2)])
    length = max(e["input_ids"].shape[1] for e in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
    attention = torch.zeros((len(samples), length), dtype=torch.long)
    token_types = torch.zeros((len(samples), length), dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    for row, (e, spans) in enumerate(zip(encoded, answer_spans, strict=True)):
        n = e["input_ids"].shape[1]
        input_ids[row, length - n:] = e["input_ids"][0]
        attention[row, length - n:] = 1
        token_types[row, length - n:] = e["mm_token_type_ids"][0]
        for from_end, answer_length in spans:
            columns = slice(length - from_end, length - from_end + answer_length)
            labels[row, columns] = input_ids[row, columns]
    batch = dict(input_ids=input_ids, attention_mask=attention, mm_token_type_ids=token_types,
                 pixel_values=torch.cat([e["pixel_values"] for e in encoded]),
                 image_grid_thw=torch.cat([e["image_grid_thw"] for e in encoded]))
    return batch, labels


def token_classes(volume, tokens_per_side: int, num_classes: int) -> torch.Tensor:
    """int64 ``[D * T]``, in the merged tokens' order: per visual token the label (lesion class
    1 + index, v2's calcification) covering most of its block, 0 where no finding voxel lies."""
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(volume.labels.astype(np.int64)), num_classes)
    area = torch.nn.functional.adaptive_avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), tokens_per_side)
    lesion = area[:, 1:]
    best = lesion.argmax(1) + 1
    return torch.where(lesion.amax(1) > 0, best, 0).reshape(-1)


def _equal_blocks_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """The vision attention of one tower call whose images all have the same patch count, as one
    batched sdpa over ``[images, heads, patches, dim]``: the same block-diagonal attention as the
    per-image loop of transformers' non-flash path, without a kernel launch per image."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    block = int(cu_seqlens[1] - cu_seqlens[0])
    q, k, v = (t.reshape(seq_length // block, block, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq_length, -1))


def use_batched_vision_attention(model) -> None:
    """Route ``model``'s vision attention through :func:`_equal_blocks_attention` (every slice of the
    task has the same grid, so the blocks are equal)."""
    import types

    for block in model.model.visual.blocks:
        block.attn.forward = types.MethodType(_equal_blocks_attention, block.attn)


def answer_loss(model, batch, labels):
    """Cross-entropy of the answer tokens; logits only from the first answer column on."""
    first = int((labels != -100).int().argmax(1).min())
    keep = labels.shape[1] - first + 1
    logits = model(**batch, logits_to_keep=keep).logits[:, :-1]
    targets = labels[:, -keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100)


def first_token_predictions(model, processor, samples, resolution: int, batch_size: int = 8) -> list[str]:
    """The greedy first answer token of each sample, decoded (answers differ in their first byte)."""
    predictions = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch, _ = collate(processor, samples[start:start + batch_size], with_answers=False,
                               resolution=resolution)
            tokens = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)
            predictions.extend(processor.tokenizer.decode([t]) for t in tokens.tolist())
    return predictions


def first_token_correct(sample, prediction: str) -> bool:
    return prediction == sample.answer[0]


def lr_at(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then constant: the first N steps of any run are the same, so the checkpoint
    after N steps (``--save-every``) is what ``--steps N`` reproduces."""
    return peak * min(1.0, (step + 1) / warmup)


def train(steps: int, *, version: int = 2, batch_size: int = 8, lr: float = 3e-3, warmup: int = 20, val=(),
          val_every: int = 0, save_every: int = 0, out: Path | None = None, vision_steps: int | None = None,
          max_seconds: float | None = None, log=print):
    """Train task ``version`` from the seeded initialisation for ``steps`` steps (the first
    ``vision_steps`` the vision tower and the probe alone); returns (model, processor, curve) with the
    per-step loss and, every ``val_every`` steps, the first-token accuracy on ``val``. With
    ``save_every`` and ``out``, the weights after every ``save_every`` steps go to ``out/step-N`` and
    the curve so far to ``out/curve.json``. With ``max_seconds`` training stops after the first step
    that ends past it (a shared machine's wall-clock budget); the curve's length then says how many
    steps ran, and ``steps`` = that count reproduces the same weights (the rate schedule does not
    depend on ``steps``)."""
    setup = setup_for(version)
    if vision_steps is None:
        vision_steps = VISION_STEPS[version]
    torch.manual_seed(SEED)
    processor = setup.processor()
    model = setup.build(processor.tokenizer)
    use_batched_vision_attention(model)
    model.train()
    # Deep supervision while training only (the head is not saved): each merged visual token predicts
    # the lesion class under it, so the vision tower learns lesion features before the language model
    # has learned where to look; without it the model first settles on each question's prior answer.
    per_side = setup.tokens_per_side
    probe = torch.nn.Linear(model.config.vision_config.out_hidden_size, setup.probe_classes)
    merged = {}
    model.model.visual.merger.register_forward_hook(lambda module, args, output: merged.update(tokens=output))
    class_weight = torch.tensor([0.2] + [1.0] * (setup.probe_classes - 1))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n] + [probe.weight]
    plain = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)] + [probe.bias]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": plain, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    curve = {"loss": [], "probe_loss": [], "val": []}
    cache: dict = {}
    started = time.perf_counter()
    for step in range(steps):
        samples = step_samples(step, batch_size, cache, setup)
        batch, labels = collate(processor, samples, with_answers=True, resolution=setup.resolution)
        targets = torch.cat([token_classes(row[0].volume, per_side, setup.probe_classes) for row in samples])
        if step < vision_steps:
            # Stage 1: the vision tower and the probe alone (the language model is not run).
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, lr, warmup)
            model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            probe_loss = torch.nn.functional.cross_entropy(probe(merged["tokens"]), targets, weight=class_weight)
            optimizer.zero_grad(set_to_none=True)
            probe_loss.backward()
            optimizer.step()
            curve["loss"].append(None)
            curve["probe_loss"].append(round(probe_loss.item(), 6))
            if (step + 1) % 10 == 0:
                log(f"step {step + 1:5d}  probe {np.mean(curve['probe_loss'][-10:]):.4f}  "
                    f"{time.perf_counter() - started:.0f} s")
            continue
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - vision_steps, lr * JOINT_LR_SCALE, warmup)
        loss = answer_loss(model, batch, labels)
        probe_loss = torch.nn.functional.cross_entropy(probe(merged["tokens"]), targets, weight=class_weight)
        optimizer.zero_grad(set_to_none=True)
        (loss + AUX_WEIGHT * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve["loss"].append(round(loss.item(), 6))
        curve["probe_loss"].append(round(probe_loss.item(), 6))
        if (step + 1) % 10 == 0:
            log(f"step {step + 1:5d}  loss {np.mean(curve['loss'][-10:]):.4f}  "
                f"probe {np.mean(curve['probe_loss'][-10:]):.4f}  {time.perf_counter() - started:.0f} s")
        if val_every and val and ((step + 1) % val_every == 0 or step + 1 == steps):
            model.eval()
            predictions = first_token_predictions(model, processor, list(val), setup.resolution)
            model.train()
            accuracy = float(np.mean([first_token_correct(s, p) for s, p in zip(val, predictions, strict=True)]))
            curve["val"].append({"step": step + 1, "accuracy": accuracy,
                                 "seconds": round(time.perf_counter() - started, 1)})
            recent = float(np.mean([x for x in curve["loss"][-val_every:] if x is not None] or [np.nan]))
            log(f"val at step {step + 1:5d}  loss {recent:.4f}  val {accuracy:.3f}  "
                f"{time.perf_counter() - started:.0f} s")
        if save_every and out is not None and (step + 1) % save_every == 0:
            save(model, out / f"step-{step + 1}")
            (out / "curve.json").write_text(json.dumps(curve) + "\n")
        if max_seconds is not None and time.perf_counter() - started > max_seconds and step + 1 < steps:
            log(f"stopping after step {step + 1}: past the {max_seconds:.0f} s budget")
            if val_every and val:
                model.eval()
                predictions = first_token_predictions(model, processor, list(val), setup.resolution)
                model.train()
                accuracy = float(np.mean([first_token_correct(s, p) for s, p in zip(val, predictions, strict=True)]))
                curve["val"].append({"step": step + 1, "accuracy": accuracy,
                                     "seconds": round(time.perf_counter() - started, 1)})
            break
    model.eval()
    return model, processor, curve


def chance(samples, setup: Setup) -> dict:
    """Uniform guessing over the answer set, and always giving the type's most frequent answer."""
    sizes = {"presence": 2, "class": len(setup.task.LESION_CLASSES), "third": 3, "count": 4, "calcification": 2}
    out = {}
    for category in setup.task.QUESTION_TYPES:
        answers = [s.answer for s in samples if s.category == category]
        if answers:
            out[category] = {"uniform": 1.0 / sizes[category],
                             "majority": Counter(answers).most_common(1)[0][1] / len(answers)}
    return out


def evaluate(model, processor, samples, setup: Setup) -> dict:
    """Test accuracy (greedy first answer token) per question type and per lesion class, with chance."""
    predictions = first_token_predictions(model, processor, samples, setup.resolution)
    correct = [first_token_correct(s, p) for s, p in zip(samples, predictions, strict=True)]
    per_type = {}
    levels = chance(samples, setup)
    for category in setup.task.QUESTION_TYPES:
        hits = [c for c, s in zip(correct, samples, strict=True) if s.category == category]
        if hits:
            per_type[category] = {"n": len(hits), "accuracy": float(np.mean(hits)), "chance": levels[category]}
    per_class = {}
    for cls in sorted({s.lesion_class for s in samples}):
        hits = [c for c, s in zip(correct, samples, strict=True) if s.lesion_class == cls]
        per_class[cls] = {"n": len(hits), "accuracy": float(np.mean(hits))}
    uniform = float(np.mean([levels[s.category]["uniform"] for s in samples]))
    majority = float(np.mean([levels[s.category]["majority"] for s in samples]))
    return {"n": len(samples), "accuracy": float(np.mean(correct)), "chance_uniform": uniform,
            "chance_majority": majority, "per_type": per_type, "per_lesion_class": per_class}


def lesion_focus(model, processor, volumes, setup: Setup, **prune) -> dict:
    """Prune each volume's presence question with ``apply_medpruner(model, record_tokens=True, **prune)``
    and compare what is kept on lesion tokens and on background tokens: over the whole volume (slices
    dropped by IAF count as dropped), inside the slices that hold a lesion (DINS alone), the IAF keep
    rate of lesion and lesion-free slices, and the DINS importance of lesion tokens relative to the
    background tokens of the same slices (mean ratio and the probability that a lesion token outranks
    a background token of its slice)."""
    from medpruner.pipeline import apply_medpruner, remove_medpruner

    per_side = setup.tokens_per_side
    kept = {"lesion": [0, 0], "background": [0, 0], "lesion_slice_lesion": [0, 0],
            "lesion_slice_background": [0, 0], "iaf_lesion_slices": [0, 0], "iaf_other_slices": [0, 0]}
    ratios, ranks, retention = [], [], []
    apply_medpruner(model, record_tokens=True, **prune)
    try:
        for volume in volumes:
            question = next(s for s in setup.task.questions_for(volume) if s.category == "presence")
            with torch.no_grad():
                model(**encode(processor, volume.data, question.question, setup.resolution))
            stats = model.medpruner_stats
            retention.append(stats.retention)
            per_slice = stats.tokens_per_slice[0]
            encoded = [i for i, n in enumerate(per_slice) if n > 0]
            keep = stats.token_keep.numpy().reshape(len(encoded), -1)
            scores = stats.token_scores.numpy().reshape(len(encoded), -1)
            lesion = volume.token_mask(per_side)
            full_keep = np.zeros_like(lesion)
            full_keep[encoded] = keep
            for name, where in (("lesion", lesion), ("background", ~lesion)):
                kept[name][0] += int(full_keep[where].sum())
                kept[name][1] += int(where.sum())
            for row, s in enumerate(encoded):
                if lesion[s].any() and (~lesion[s]).any():
                    kept["lesion_slice_lesion"][0] += int(keep[row][lesion[s]].sum())
                    kept["lesion_slice_lesion"][1] += int(lesion[s].sum())
                    kept["lesion_slice_background"][0] += int(keep[row][~lesion[s]].sum())
                    kept["lesion_slice_background"][1] += int((~lesion[s]).sum())
                    inside, outside = scores[row][lesion[s]], scores[row][~lesion[s]]
                    ratios.append(float(inside.mean() / outside.mean()))
                    ranks.append(float((inside[:, None] > outside[None, :]).mean()
                                       + 0.5 * (inside[:, None] == outside[None, :]).mean()))
            has_lesion = lesion.any(axis=1)
            for name, where in (("iaf_lesion_slices", has_lesion), ("iaf_other_slices", ~has_lesion)):
                kept[name][0] += int(np.isin(np.nonzero(where)[0], encoded).sum())
                kept[name][1] += int(where.sum())
    finally:
        remove_medpruner(model)
    out = {name: {"kept": k, "total": n, "fraction": k / n if n else None} for name, (k, n) in kept.items()}
    out.update(volumes=len(volumes), prune=prune, mean_retention=float(np.mean(retention)),
               importance_ratio_lesion_to_background=float(np.mean(ratios)) if ratios else None,
               lesion_outranks_background=float(np.mean(ranks)) if ranks else None)
    return out


def pruned_accuracy(model, processor, samples, setup: Setup, **prune) -> dict:
    """First-token accuracy per question type with ``apply_medpruner(model, **prune)`` (no pruning when
    ``prune`` is empty), one question per forward, and the mean retention."""
    from medpruner.pipeline import apply_medpruner, remove_medpruner

    if prune:
        apply_medpruner(model, **prune)
    correct, retention = [], []
    try:
        with torch.no_grad():
            for sample in samples:
                logits = model(**encode(processor, sample.volume.data, sample.question, setup.resolution)).logits[0, -1]
                correct.append(first_token_correct(sample, processor.tokenizer.decode([int(logits.argmax())])))
                retention.append(model.medpruner_stats.retention if prune else 1.0)
    finally:
        remove_medpruner(model)
    per_type = {c: float(np.mean([k for k, s in zip(correct, samples, strict=True) if s.category == c]))
                for c in setup.task.QUESTION_TYPES if any(s.category == c for s in samples)}
    return {"prune": prune, "n": len(samples), "accuracy": float(np.mean(correct)),
            "mean_retention": float(np.mean(retention)), "per_type": per_type}


def save(model, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file; the tied lm_head is the embedding and is not stored twice.
    state = {name: tensor.detach().to(torch.float16).contiguous()
             for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    path = directory / "model.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def load_shipped(setup: Setup, out: Path | None):
    """v1: the package's checkpoint; later versions: ``out/model.safetensors``."""
    if setup.version == 1:
        from medpruner.checkpoints import load_tiny_vqa

        return load_tiny_vqa(version=1)
    if out is None:
        raise ValueError("--out names the folder of the weights to load")
    return setup.load(out / "model.safetensors")


def analyse(args, setup: Setup) -> dict:
    """Pruning on the shipped checkpoint: lesion focus at the paper's tau on test volumes with lesions,
    and first-token accuracy on the first ``--prune-volumes`` test volumes' questions without pruning,
    at tau 0.9 and at fixed budgets of 50% and 25% of the visual tokens."""
    model, processor = load_shipped(setup, args.out)
    with_lesions = []
    index = 0
    while len(with_lesions) < args.focus_volumes:
        volume = setup.task.generate_volume("test", index)
        if volume.lesions:
            with_lesions.append(volume)
        index += 1
    out = {"lesion_focus": {
        "tau_0.9": lesion_focus(model, processor, with_lesions, setup, tau=0.9),
        "budget_0.25": lesion_focus(model, processor, with_lesions, setup, budget=0.25),
    }}
    samples = setup.task.generate_split("test", args.prune_volumes)
    out["accuracy"] = [pruned_accuracy(model, processor, samples, setup, **prune)
                       for prune in ({}, {"tau": 0.9}, {"budget": 0.5}, {"budget": 0.25})]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", type=int, choices=(1, 2), default=2, help="synthetic task version")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vision-steps", type=int, default=None,
                        help="first steps that train the vision tower and the token probe alone (default: "
                             f"{', '.join(f'v{v} {n}' for v, n in VISION_STEPS.items())})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-volumes", type=int, default=20)
    parser.add_argument("--val-every", type=int, default=250)
    parser.add_argument("--test-volumes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for model.safetensors (default: not saved)")
    parser.add_argument("--record", type=Path, help="JSON file for the curve and the test accuracy")
    parser.add_argument("--analyse", action="store_true",
                        help="instead of training: prune with the shipped checkpoint and add the lesion focus "
                             "and the accuracy at several budgets to --record")
    parser.add_argument("--save-every", type=int, default=0, help="also save out/step-N every N steps")
    parser.add_argument("--max-seconds", type=float,
                        help="stop training after the step that ends past this many seconds (the record says how "
                             "many steps ran; --steps with that count reproduces the weights)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="evaluate the shipped weights (saved by a run after --steps steps, with out/curve.json "
                             "from that run) instead of training")
    parser.add_argument("--focus-volumes", type=int, default=30)
    parser.add_argument("--prune-volumes", type=int, default=60)
    args = parser.parse_args(argv)
    setup = setup_for(args.version)
    if args.vision_steps is None:
        args.vision_steps = VISION_STEPS[args.version]
    torch.set_num_threads(args.threads)
    if args.analyse:
        if args.record is None or not args.record.is_file():
            parser.error("--analyse needs --record naming an existing training record")
        record = json.loads(args.record.read_text())
        started = time.perf_counter()
        record["pruning"] = analyse(args, setup)
        record["pruning"]["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(record["pruning"], indent=1))
        args.record.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    if args.evaluate_only:
        # The curve of the run that saved the shipped weights, cut at the steps they were saved after.
        curve = json.loads((args.out / "curve.json").read_text())
        curve = {"loss": curve["loss"][:args.steps], "probe_loss": curve["probe_loss"][:args.steps],
                 "val": [v for v in curve["val"] if v["step"] <= args.steps]}
        model, processor = load_shipped(setup, args.out)
        train_seconds = curve["val"][-1]["seconds"] if curve["val"] else None
        val = setup.task.generate_split("val", args.val_volumes)
    else:
        val = setup.task.generate_split("val", args.val_volumes)
        started = time.perf_counter()
        model, processor, curve = train(args.steps, version=args.version, batch_size=args.batch_size, lr=args.lr,
                                        val=val, val_every=args.val_every, save_every=args.save_every, out=args.out,
                                        vision_steps=args.vision_steps, max_seconds=args.max_seconds)
        train_seconds = round(time.perf_counter() - started, 1)
        args.steps = len(curve["loss"])
        print(f"trained {args.steps} steps in {train_seconds:.0f} s", flush=True)
        if args.out:
            print(f"saved {save(model, args.out)}")
    test = setup.task.generate_split("test", args.test_volumes)
    result = evaluate(model, processor, test, setup)
    print(json.dumps({k: v for k, v in result.items() if k != "per_lesion_class"}, indent=1))
    if args.record:
        record = {
            "what": "tiny Qwen3-VL trained on the synthetic 3D VQA task (scripts/train_tiny_vqa.py)",
            "date": date.today().isoformat(), "git_commit": _git_commit(), "python": sys.version.split()[0],
            "torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
            "version": args.version, "resolution": setup.resolution, "patch_size": setup.patch,
            "tokens_per_slice": setup.tokens_per_side**2,
            "steps": args.steps, "vision_steps": args.vision_steps, "batch_size": args.batch_size, "lr": args.lr,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_config": model.config.to_dict(),
            "train_seconds": train_seconds, "train_volumes_seen": args.steps * args.batch_size,
            "curve": curve, "val_questions": len(val), "test_volumes": args.test_volumes,
            "test": result, "scoring": "greedy first answer token (answers differ in their first byte)",
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
