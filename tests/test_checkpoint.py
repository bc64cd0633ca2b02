"""The shipped tiny VQA checkpoint: it loads offline from package data, answers a fixed test subset
well above chance, its training script's fast input path equals ``volume_to_inputs``, and a short run
of the script reproduces the start of the recorded training curve."""

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
    TINY_VQA_WEIGHTS,
    load_tiny_vqa,
    tiny_vqa_processor,
)
from medpruner.pipeline import volume_to_inputs
from medpruner.synthetic import generate_split, generate_volume, questions_for

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("index", [0, 3])
def test_fast_encoding_equals_volume_to_inputs(script, index):
    processor = tiny_vqa_processor()
    volume = generate_volume("test", index)
    for sample in questions_for(volume)[:2]:
        expected = volume_to_inputs(processor, volume.data, sample.question, family="qwen3_vl",
                                    resolution=TINY_VQA_RESOLUTION)
        got = script.encode(processor, volume.data, sample.question)
        for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
        # both floor the slices to 1/255 steps; float32 rounding of the normalisation remains
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-6)


def test_batched_vision_attention_equals_the_per_image_loop(script, checkpoint):
    """The training-time attention shortcut computes what the model's own code computes."""
    model, processor = checkpoint
    samples = generate_split("val", 2)[:3]
    batch, _ = script.collate(processor, samples, with_answers=True)
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
    predictions = script.first_token_predictions(model, processor, samples)
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
    _, _, curve = script.train(steps, batch_size=record["batch_size"], lr=record["lr"])
    assert curve["loss"] == record["curve"]["loss"][:steps]
    np.testing.assert_allclose(curve["probe_loss"], record["curve"]["probe_loss"][:steps], rtol=2e-3, atol=2e-3)
