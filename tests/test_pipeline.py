"""The integration layer's public surface: MedPrunerConfig (validation, JSON), apply/remove, the stats
and debug log of a pruned request, and volume_to_inputs for each family."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import gemma_processor, qwen_processor, synthetic_volume, tiny_qwen3_vl  # noqa: E402
from medpruner import MedPrunerConfig, PruneStats, apply_medpruner, remove_medpruner, volume_to_inputs  # noqa: E402
from medpruner.pipeline import ct_windows_to_rgb  # noqa: E402

BACKEND = "torch"


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3_vl()


@pytest.fixture(scope="module")
def processor():
    return qwen_processor("qwen3_vl")


@pytest.fixture(autouse=True)
def _unpatched(model):
    remove_medpruner(model)
    yield
    remove_medpruner(model)


# -------------------------------------------------------------------------------------------- config
def test_config_defaults_are_paper_faithful():
    config = MedPrunerConfig()
    assert (config.gamma, config.tau, config.merge, config.mode) == (0.05, 0.9, True, "fast")
    assert config.temperature is None and config.importance_layer == -1 and config.context_frac == 0.05
    assert config.resolved_temperature(2.0) == 2.0
    assert MedPrunerConfig(temperature=1.5).resolved_temperature(2.0) == 1.5


@pytest.mark.parametrize(
    "config",
    [
        MedPrunerConfig(),
        MedPrunerConfig(gamma=-1.0, tau=1.0, merge=False, mode="paper", temperature=0.5, importance_layer=0),
        MedPrunerConfig(context_frac=0.0, min_keep=3, backend="torch"),
    ],
)
def test_config_json_round_trip(config):
    text = config.to_json(indent=2)
    assert json.loads(text) == config.to_dict()
    assert MedPrunerConfig.from_json(text) == config


@pytest.mark.parametrize(
    "kwargs, error, field",
    [
        ({"gamma": "0.1"}, TypeError, "gamma"),
        ({"gamma": True}, TypeError, "gamma"),
        ({"gamma": float("inf")}, ValueError, "gamma"),
        ({"tau": 0.0}, ValueError, "tau"),
        ({"tau": float("nan")}, ValueError, "tau"),
        ({"merge": 1}, TypeError, "merge"),
        ({"mode": "FAST"}, ValueError, "mode"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": "2"}, TypeError, "temperature"),
        ({"importance_layer": 1.0}, TypeError, "importance_layer"),
        ({"context_frac": -0.1}, ValueError, "context_frac"),
        ({"min_keep": 0}, ValueError, "min_keep"),
        ({"min_keep": 2.0}, TypeError, "min_keep"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"record_tokens": 1}, TypeError, "record_tokens"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, error, field):
    with pytest.raises(error, match=field):
        MedPrunerConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields_and_non_dicts():
    with pytest.raises(ValueError, match="gama"):
        MedPrunerConfig.from_dict({"gama": 0.1})
    with pytest.raises(TypeError, match="dict"):
        MedPrunerConfig.from_dict([("gamma", 0.1)])


# ----------------------------------------------------------------------------------- apply / remove
def test_apply_returns_the_model_and_records_the_config(model):
    assert apply_medpruner(model, tau=0.7, backend=BACKEND) is model
    assert model.medpruner_config == MedPrunerConfig(tau=0.7, backend=BACKEND)
    assert model.medpruner_stats is None
    config = MedPrunerConfig(mode="paper", backend=BACKEND)
    apply_medpruner(model, config=config)
    assert model.medpruner_config is config


def test_apply_with_config_object_validates_it(model):
    config = MedPrunerConfig()
    config.tau = 0.0
    with pytest.raises(ValueError, match="tau"):
        apply_medpruner(model, config=config)
    with pytest.raises(TypeError, match="MedPrunerConfig"):
        apply_medpruner(model, config={"tau": 0.5})
    assert "forward" not in model.__dict__


def test_remove_is_idempotent_and_restores_the_class_methods(model):
    assert remove_medpruner(model) is model
    apply_medpruner(model, backend=BACKEND)
    apply_medpruner(model, tau=0.5, backend=BACKEND)
    assert "forward" in model.__dict__ and "generate" in model.__dict__
    remove_medpruner(model)
    remove_medpruner(model)
    for name in ("forward", "generate", "medpruner_config", "medpruner_stats"):
        assert name not in model.__dict__
    assert model.forward.__func__ is type(model).forward


def test_unsupported_model_error_names_the_class_and_the_supported_ones():
    class MyVLM(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="MyVLM") as info:
        apply_medpruner(MyVLM())
    assert "Qwen3VLForConditionalGeneration" in str(info.value)
    assert "Gemma3ForConditionalGeneration" in str(info.value)


# --------------------------------------------------------------------------------------- stats, log
def test_stats_describe_the_last_request(model, processor, caplog):
    volume = synthetic_volume(6, size=32, seed=4)
    inputs = volume_to_inputs(processor, volume, "Any lesion?", family="qwen3_vl")
    apply_medpruner(model, tau=0.6, backend=BACKEND)
    with caplog.at_level(logging.DEBUG, logger="medpruner"), torch.no_grad():
        model(**inputs)
    stats = model.medpruner_stats
    assert isinstance(stats, PruneStats) and stats.mode == "fast"
    assert stats.slices_total == [6]
    assert 1 <= stats.slices_kept[0] < 6
    per_slice = stats.tokens_per_slice[0]
    assert len(per_slice) == 6 and sum(per_slice) == stats.tokens_after
    assert sum(1 for n in per_slice if n > 0) == stats.slices_kept[0] == stats.slices_encoded
    assert stats.tokens_before == 6 * 4
    assert stats.retention == pytest.approx(stats.tokens_after / stats.tokens_before)
    assert stats.prune_seconds > 0
    assert any(record.getMessage() == stats.summary() for record in caplog.records)
    assert "medpruner[fast]" in stats.summary()


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_recorded_tokens_match_the_kept_counts(model, processor, mode):
    volume = synthetic_volume(6, size=32, seed=4)
    inputs = volume_to_inputs(processor, volume, "Any lesion?", family="qwen3_vl")
    apply_medpruner(model, tau=0.6, mode=mode, backend=BACKEND)
    with torch.no_grad():
        model(**inputs)
    assert model.medpruner_stats.token_scores is None and model.medpruner_stats.token_keep is None
    apply_medpruner(model, tau=0.6, mode=mode, backend=BACKEND, record_tokens=True)
    with torch.no_grad():
        model(**inputs)
    stats = model.medpruner_stats
    encoded_tokens = 4 * stats.slices_encoded
    assert stats.token_scores.shape == stats.token_keep.shape == (encoded_tokens,)
    assert stats.token_scores.device.type == "cpu" and stats.token_keep.dtype == torch.bool
    assert int(stats.token_keep.sum()) == stats.tokens_after
    assert bool(torch.isfinite(stats.token_scores).all())


def test_stats_of_an_empty_request_have_full_retention():
    assert PruneStats(mode="fast").retention == 1.0


def test_importance_layer_other_than_last_runs(model, processor):
    inputs = volume_to_inputs(processor, synthetic_volume(4, size=32, seed=5), "Q?", family="qwen3_vl")
    apply_medpruner(model, tau=0.5, importance_layer=0, backend=BACKEND)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] < inputs["input_ids"].shape[1]


# ----------------------------------------------------------------------------------- volume -> inputs
def test_volume_to_inputs_qwen_one_image_per_slice_with_pinned_grid(processor):
    volume = synthetic_volume(5, size=40, seed=6)
    inputs = volume_to_inputs(processor, volume, "Describe.", family="qwen3_vl", resolution=32)
    grid = inputs["image_grid_thw"]
    assert grid.shape == (5, 3) and (grid == torch.tensor([1, 4, 4])).all()
    ids = inputs["input_ids"][0]
    vocab = processor.tokenizer
    assert (ids == vocab.convert_tokens_to_ids("<|vision_start|>")).sum() == 5
    assert (ids == vocab.convert_tokens_to_ids("<|image_pad|>")).sum() == 5 * 4
    assert vocab.decode(ids).endswith("Describe.")
    pixels = inputs["pixel_values"]
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    again = volume_to_inputs(processor, volume, "Describe.", family="qwen3_vl", resolution=32)
    assert torch.equal(again["pixel_values"], pixels)


def test_volume_to_inputs_qwen_keeps_size_without_resolution(processor):
    volume = synthetic_volume(3, size=64, seed=7)
    inputs = volume_to_inputs(processor, volume, "Q", family="qwen3_vl")
    assert (inputs["image_grid_thw"] == torch.tensor([1, 8, 8])).all()


def test_volume_to_inputs_feeds_a_patched_model_end_to_end(model, processor):
    volume = synthetic_volume(6, size=32, seed=8)
    inputs = volume_to_inputs(processor, volume, "Any lesion?", family="qwen3_vl")
    apply_medpruner(model, tau=0.6, backend=BACKEND)
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert model.medpruner_stats.tokens_after < model.medpruner_stats.tokens_before


def test_volume_to_inputs_medgemma_prefixes_every_slice():
    processor = gemma_processor()
    volume = synthetic_volume(3, size=48, seed=9)
    inputs = volume_to_inputs(processor, volume, "Findings?", family="medgemma")
    assert inputs["pixel_values"].shape == (3, 3, 64, 64)
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    positions = [text.index(f"SLICE {i}: ") for i in (1, 2, 3)]
    assert positions == sorted(positions)
    assert text.count("<start_of_image>") == 3
    assert text.rstrip().endswith("Findings?")


def test_volume_to_inputs_ct_windows_make_three_distinct_channels():
    processor = gemma_processor()
    hu = torch.linspace(-1000.0, 1000.0, 2 * 48 * 48).reshape(2, 48, 48)
    rgb = ct_windows_to_rgb(hu)
    assert rgb.shape == (2, 48, 48, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert not torch.equal(rgb[..., 0], rgb[..., 1]) and not torch.equal(rgb[..., 1], rgb[..., 2])
    inputs = volume_to_inputs(processor, hu, "Q", family="medgemma", ct_windows=True)
    pixels = inputs["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    assert not torch.allclose(pixels[:, 0], pixels[:, 1])


def test_volume_to_inputs_accepts_rgb_and_numpy(processor):
    volume = synthetic_volume(2, size=32, seed=10)
    rgb = volume.unsqueeze(-1).expand(-1, -1, -1, 3)
    from_grey = volume_to_inputs(processor, volume, "Q", family="qwen2_5_vl")
    from_rgb = volume_to_inputs(processor, rgb.numpy(), "Q", family="qwen2_5_vl")
    torch.testing.assert_close(from_rgb["pixel_values"], from_grey["pixel_values"])


@pytest.mark.parametrize(
    "volume, kwargs, error, match",
    [
        (synthetic_volume(2, size=32), {"family": "llava"}, ValueError, "family"),
        (synthetic_volume(2, size=32), {"family": "qwen3_vl", "prompt": 3}, TypeError, "prompt"),
        (synthetic_volume(2, size=32) * 300, {"family": "qwen3_vl"}, ValueError, "volume"),
        (torch.full((2, 32, 32), float("nan")), {"family": "qwen3_vl"}, ValueError, "volume"),
        (torch.rand(32, 32), {"family": "qwen3_vl"}, ValueError, "volume"),
        (torch.rand(0, 32, 32), {"family": "qwen3_vl"}, ValueError, "volume"),
        (torch.rand(2, 32, 32, 4), {"family": "qwen3_vl"}, ValueError, "volume"),
        (synthetic_volume(2, size=32), {"family": "qwen3_vl", "resolution": 0}, ValueError, "resolution"),
        (
            synthetic_volume(2, size=32),
            {"family": "qwen3_vl", "resolution": (8, 8, 8)},
            ValueError,
            "resolution",
        ),
        (torch.rand(2, 32), {"family": "medgemma", "ct_windows": True}, ValueError, "volume_hu"),
    ],
)
def test_volume_to_inputs_rejects_bad_arguments(processor, volume, kwargs, error, match):
    kwargs = {"prompt": "Q", **kwargs}
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=match):
        volume_to_inputs(processor, volume, prompt, **kwargs)
