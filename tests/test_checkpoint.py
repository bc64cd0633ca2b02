"""The shipped tiny VQA checkpoints: v1 (``checkpoints/tiny_vqa``, 4 tokens per slice, task v1) and v2
(``checkpoints/tiny_vqa_v2``, 16 tokens per slice, the CT-like task v2) load offline from package data
(``load_tiny_vqa(version=...)``). Each answers a fixed test
subset above chance, its record is above every question type's majority answer, the script's fast
input path equals ``volume_to_inputs``, and a short run of the script reproduces the start of the
recorded training curve."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from medpruner.checkpoints import (
    TINY_VQA_RESOLUTION,
    TINY_VQA_V2_DIR,
    TINY_VQA_V2_WEIGHTS,
    TINY_VQA_WEIGHTS,
    load_tiny_vqa,
)
from medpruner.pipeline import volume_to_inputs
from medpruner.synthetic import ct, generate_split

ROOT = Path(__file__).resolve().parents[1]
V2_WEIGHTS = TINY_VQA_V2_WEIGHTS
V2_RECORD = TINY_VQA_V2_DIR / "training.json"
# The v2 weights are trained by scripts/train_tiny_vqa.py (issue 26); until they are in the package the
# v2 checkpoint tests skip, naming why (the v2 training-script tests run regardless).
needs_v2 = pytest.mark.skipif(not V2_WEIGHTS.is_file(), reason=f"no v2 checkpoint at {V2_WEIGHTS}")
MARGIN_SUBSET = 0.05
MARGIN_PER_TYPE = 0.05


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny_vqa", ROOT / "scripts" / "train_tiny_vqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record() -> dict:
    records = sorted((ROOT / "bench" / "results").glob("tiny-vqa-training-*.json"))
    assert records, "no bench/results/tiny-vqa-training-*.json"
    return json.loads(records[-1].read_text())


@pytest.fixture(scope="module")
def script():
    return _script()


@pytest.fixture(scope="module")
def checkpoint():
    torch.manual_seed(0)
    return load_tiny_vqa()


@pytest.fixture(scope="module")
def checkpoint_v2():
    return load_tiny_vqa(version=2)


def test_weights_are_small_package_data():
    assert TINY_VQA_WEIGHTS.is_file()
    assert TINY_VQA_WEIGHTS.stat().st_size <= 20 * 2**20


def test_loads_offline_with_the_stored_weights(checkpoint, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = checkpoint
    assert not model.training
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    stored = load_file(str(TINY_VQA_WEIGHTS))
    state = model.state_dict()
    assert set(stored) == set(state) - {"lm_head.weight"}
    for name, tensor in stored.items():
        assert tensor.dtype == torch.float16
        torch.testing.assert_close(state[name], tensor.float(), rtol=0, atol=0)
    assert processor.image_processor.patch_size * processor.image_processor.merge_size == 32


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("index", [0, 3])
def test_fast_encoding_equals_volume_to_inputs(script, version, index):
    setup = script.setup_for(version)
    processor = setup.processor()
    volume = setup.task.generate_volume("test", index)
    for sample in setup.task.questions_for(volume)[:2]:
        expected = volume_to_inputs(processor, volume.data, sample.question, family="qwen3_vl",
                                    resolution=setup.resolution)
        got = script.encode(processor, volume.data, sample.question, setup.resolution)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
        # both floor the slices to 1/255 steps; float32 rounding of the normalisation remains
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)


def test_batched_vision_attention_equals_the_per_image_loop(script, checkpoint):
    """The training-time attention shortcut computes what the model's own code computes."""
    model, processor = checkpoint
    samples = generate_split("val", 2)[:3]
    batch, _ = script.collate(processor, samples, with_answers=True, resolution=TINY_VQA_RESOLUTION)
    with torch.no_grad():
        expected = model(**batch).logits
        copy = type(model)(model.config)
        copy.load_state_dict(model.state_dict())
        script.use_batched_vision_attention(copy.eval())
        got = copy(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_above_chance_on_a_fixed_test_subset(script, checkpoint):
    """The first 40 test volumes' questions: overall well above uniform guessing, and the presence and
    count questions above always giving their most frequent answer."""
    model, processor = checkpoint
    samples = generate_split("test", 40)
    predictions = script.first_token_predictions(model, processor, samples, TINY_VQA_RESOLUTION)
    correct = [script.first_token_correct(s, p) for s, p in zip(samples, predictions, strict=True)]
    options = {"presence": 2, "class": 5, "third": 3, "count": 4}
    assert np.mean(correct) >= np.mean([1 / options[s.category] for s in samples]) + 0.2
    learned = [(s, c) for s, c in zip(samples, correct, strict=True) if s.category in ("presence", "count")]
    majority = sum(Counter(s.answer for s, _ in learned if s.category == category).most_common(1)[0][1]
                   for category in ("presence", "count")) / len(learned)
    assert np.mean([c for _, c in learned]) >= majority + 0.08


def test_record_is_above_chance_per_question_type():
    test = _record()["test"]
    assert test["n"] >= 500
    assert test["accuracy"] > test["chance_majority"] + 0.1
    for category in ("presence", "class", "third", "count"):
        result = test["per_type"][category]
        assert result["accuracy"] > result["chance"]["majority"] + 0.05, category


def test_short_run_reproduces_the_recorded_curve(script):
    """The first steps of the script (the vision stage: the probe loss) against the recorded run."""
    record = _record()
    steps = 3
    torch.set_num_threads(record["threads"])
    _, _, curve = script.train(steps, version=1, batch_size=record["batch_size"], lr=record["lr"])
    assert curve["loss"] == record["curve"]["loss"][:steps]
    np.testing.assert_allclose(curve["probe_loss"], record["curve"]["probe_loss"][:steps], rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------- v2


def _v2_record() -> dict:
    return json.loads(V2_RECORD.read_text())


@needs_v2
def test_v2_weights_are_small_fp16_and_match_the_architecture(checkpoint_v2):
    from safetensors.torch import load_file

    assert V2_WEIGHTS.stat().st_size <= 20 * 2**20
    model, _ = checkpoint_v2
    stored = load_file(str(V2_WEIGHTS))
    assert set(stored) == set(model.state_dict()) - {"lm_head.weight"}
    assert all(tensor.dtype == torch.float16 for tensor in stored.values())
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert not model.training


@needs_v2
def test_v2_sees_16_tokens_per_slice(script, checkpoint_v2):
    """The record names the grid the weights were trained at, and the processor gives it."""
    record = _v2_record()
    assert (record["version"], record["resolution"], record["patch_size"]) == (2, ct.MODEL_RESOLUTION, ct.MODEL_PATCH)
    assert record["tokens_per_slice"] == ct.TOKENS_PER_SLICE == 16
    model, processor = checkpoint_v2
    assert model.config.vision_config.patch_size == ct.MODEL_PATCH
    volume = ct.generate_volume("test", 1)
    inputs = script.encode(processor, volume.data, "Q?", ct.MODEL_RESOLUTION)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == pad).sum()) == 16 * volume.depth
    assert record["model_config"]["vision_config"]["patch_size"] == ct.MODEL_PATCH


@needs_v2
def test_v2_batched_vision_attention_equals_the_per_image_loop(script, checkpoint_v2):
    model, processor = checkpoint_v2
    rows = [script.training_sample(i, script.setup_for(2)) for i in range(2)]
    batch, _ = script.collate(processor, rows, with_answers=True, resolution=ct.MODEL_RESOLUTION)
    with torch.no_grad():
        expected = model(**batch).logits
        copy = type(model)(model.config)
        copy.load_state_dict(model.state_dict())
        script.use_batched_vision_attention(copy.eval())
        got = copy(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_v2_multi_turn_rows_label_every_answer(script):
    """A v2 training row asks every applicable question once; the labels are exactly the answers and
    their closing tokens, in order."""
    setup = script.setup_for(2)
    processor = setup.processor()
    rows = [script.training_sample(i, setup) for i in range(3)]
    _, labels = script.collate(processor, rows, with_answers=True, resolution=setup.resolution)
    for row, turns in zip(labels, rows, strict=True):
        assert sorted(t.category for t in turns) == sorted(s.category for s in ct.questions_for(turns[0].volume))
        expected = "".join(t.answer + script.END for t in turns)
        assert processor.tokenizer.decode(row[row != -100]) == expected


@needs_v2
def test_v2_above_majority_on_a_fixed_test_subset(script, checkpoint_v2):
    """The first 16 test volumes' questions (~60): above always giving each type's most frequent answer."""
    model, processor = checkpoint_v2
    samples = ct.generate_split("test", 16)
    predictions = script.first_token_predictions(model, processor, samples, ct.MODEL_RESOLUTION)
    correct = [script.first_token_correct(s, p) for s, p in zip(samples, predictions, strict=True)]
    majority = sum(Counter(s.answer for s in samples if s.category == category).most_common(1)[0][1]
                   for category in {s.category for s in samples}) / len(samples)
    assert np.mean(correct) >= majority + MARGIN_SUBSET


@needs_v2
def test_v2_record_is_above_the_majority_answer_per_question_type():
    test = _v2_record()["test"]
    assert test["n"] >= 500
    assert test["accuracy"] > test["chance_majority"] + 0.1
    for category in ct.QUESTION_TYPES:
        result = test["per_type"][category]
        assert result["accuracy"] > result["chance"]["majority"] + MARGIN_PER_TYPE, category


@needs_v2
def test_v2_short_run_reproduces_the_recorded_curve(script):
    """The first steps of the script (the vision stage: the probe loss) against the recorded run."""
    record = _v2_record()
    steps = 3
    torch.set_num_threads(record["threads"])
    _, _, curve = script.train(steps, version=2, batch_size=record["batch_size"], lr=record["lr"],
                               vision_steps=record["vision_steps"])
    assert curve["loss"] == record["curve"]["loss"][:steps]
    np.testing.assert_allclose(curve["probe_loss"], record["curve"]["probe_loss"][:steps], rtol=2e-3, atol=2e-3)
