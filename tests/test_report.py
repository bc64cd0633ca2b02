"""medpruner.report: the figures (valid PNGs), report.json / report.html contents and the atomic writes
that keep a crash from leaving half a report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from medpruner import report
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 100


def test_token_heatmaps_and_report_with_tokens(tmp_path):
    slices = np.linspace(0, 1, 4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32)
    keep = np.array([True, False, True, False])
    record = {
        "config": {"gamma": 0.05},
        "volume": {"source": "synthetic"},
        "result": {"keep": keep.tolist(), "distance_to_anchor": [0.0, 0.01, 0.2, 0.03], "kept": 2},
    }
    rng = np.random.default_rng(0)
    importance = [rng.random(16), rng.random((4, 4))]
    token_keep = [importance[0] > 0.5, importance[1] > 0.5]
    written = report.write_report(
        tmp_path, record, slices, token_importance=importance, token_keep=token_keep
    )
    assert set(written) == {"montage.png", "distances.png", "tokens.png", "report.html", "report.json"}
    _assert_png(written["tokens.png"])
    assert json.loads(written["report.json"].read_text())["files"] == sorted(written)

    with pytest.raises(ValueError, match="not a square grid"):
        report.plot_token_heatmaps(slices, [0], [np.ones(12)])
    assert report.plot_token_heatmaps(slices, [0], [np.ones(12)], grid=(3, 4))[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="2 arrays for 1 slice_indices"):
        report.plot_token_heatmaps(slices, [0], importance)


def test_montage_picks_kept_and_dropped_slices():
    keep = np.zeros(100, dtype=bool)
    keep[::10] = True
    chosen = report.montage_indices(keep, 8)
    assert chosen.size == 8 and keep[chosen].sum() == 4
    assert np.all(np.diff(chosen) > 0)
    assert report.montage_indices(np.ones(5, dtype=bool), 8).tolist() == [0, 1, 2, 3, 4]
    few_kept = np.zeros(30, dtype=bool)
    few_kept[0] = True
    assert report.montage_indices(few_kept, 8).size == 8


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    report.atomic_write_text(target, "first")

    def crash(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        report.atomic_write_text(target, "second")
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_report_json_and_html_carry_the_numbers(tmp_path):
    slices = np.random.default_rng(1).random((6, 20, 24)).astype(np.float32)
    keep = np.array([True, False, False, True, True, False])
    distances = [0.0, 0.01, 0.02, 0.3, 0.12, 0.04]
    record = {
        "config": {"gamma": 0.1, "window": {"kind": "percentile", "name": "percentile"}},
        "volume": {"source": "/data/case 7.nii.gz", "shape": [6, 20, 24]},
        "result": {"keep": keep.tolist(), "distance_to_anchor": distances, "kept": 3, "num_slices": 6},
        "tokens": {
            "model": "m",
            "family": "qwen3_vl",
            "tau": 0.9,
            "tokens_after": 7,
            "tokens_before": 18,
            "token_retention": 7 / 18,
            "tokens_per_slice": [2, 0, 0, 3, 2, 0],
        },
        "timings_s": {"iaf": 0.001},
    }
    written = report.write_report(tmp_path, record, slices, html_page=True)
    assert set(written) == {"montage.png", "distances.png", "report.html", "report.json"}
    saved = json.loads(written["report.json"].read_text())
    assert saved["result"] == record["result"] and saved["tokens"] == record["tokens"]
    assert saved["files"] == sorted(written)
    for name in ("montage.png", "distances.png"):
        _assert_png(written[name])
    page = written["report.html"].read_text()
    assert "/data/case 7.nii.gz" in page and "3/6" in page and "7/18" in page and "[2, 0, 0, 3, 2, 0]" in page
    assert page.count("data:image/png;base64,") == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    without_html = report.write_report(tmp_path / "plain", record, slices, html_page=False)
    assert "report.html" not in without_html and not (tmp_path / "plain" / "report.html").exists()


def test_to_json_handles_numpy_and_rejects_nan():
    assert json.loads(report.to_json({"a": np.int64(3), "b": np.arange(2), "c": np.float32(0.5)})) == {
        "a": 3,
        "b": [0, 1],
        "c": 0.5,
    }
    with pytest.raises(ValueError):
        report.to_json({"x": float("nan")})


def test_environment_names_the_installed_dicom_decoders():
    from importlib import metadata

    packages = report.environment(device="cpu", backend="torch")["packages"]
    for name in ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"):
        assert packages[name] == metadata.version(name)


def _table_cells(page: str) -> dict[str, str]:
    """The summary table's rows as {header: cell text} (tags removed, entities decoded)."""
    import html
    import re

    table = page.split("<figure")[0].split("<body>")[1]
    rows = [segment.split("</th>", 1) for segment in table.split("<tr><th>")[1:]]
    return {html.unescape(name): " ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split()) for name, cell in rows}


def test_html_shows_window_timings_guesses_and_nonfinite_as_text():
    record = {
        "config": {"gamma": 0.1, "window": {"kind": "ct", "name": "lung", "level": -600.0, "width": 1500.0}},
        "volume": {
            "source": "/data/a.npy", "shape": [6, 20, 24], "spacing_mm": [1.0, 1.0, 1.0], "orientation": "RAS",
            "modality": "MR", "assumed": ["modality", "spacing", "orientation"], "constant": True,
            "nonfinite": {"nan": 2, "posinf": 0, "neginf": 1, "voxels": 2880, "policy": "NaN -> min",
                          "finite_min": -3.0, "finite_max": 7.5},
        },
        "result": {"kept": 3, "num_slices": 6},
        "timings_s": {"load": 0.0012, "iaf": 0.25},
    }
    cells = _table_cells(report.render_html(record, {}))
    assert cells["window"] == "CT lung: level -600 HU, width 1500 HU"
    assert cells["timings"] == "load 1.2 ms iaf 250.0 ms"
    assert cells["modality"] == "MR (assumed: not recorded in the file)"
    assert cells["spacing (mm)"] == "1 x 1 x 1 (assumed: not recorded in the file)"
    assert cells["non-finite voxels"] == "2 NaN, 1 -Inf of 2880 voxels replaced before windowing: NaN -> min " \
        "(finite range -3 .. 7.5)"
    assert cells["warning"].startswith("constant volume")
    record["config"]["window"] = {"kind": "percentile", "name": "percentile", "low_percentile": 0.5,
                                  "high_percentile": 99.5}
    record["volume"]["assumed"] = []
    cells = _table_cells(report.render_html(record, {}))
    assert cells["window"] == "percentile scaling 0.5% .. 99.5% to [0, 1]" and cells["modality"] == "MR"
    assert "{" not in "".join(cells.values())


def test_montage_caption_says_when_slices_are_sampled_and_what_is_marked():
    from medpruner.report import montage_indices, montage_summary

    keep = np.zeros(100, dtype=bool)
    keep[::7] = True
    shown = montage_indices(keep, 40).size
    assert shown == 40
    caption = montage_summary(keep, shown, 0.05, {3: "lesion", 9: "lesion"})
    assert caption == ("15/100 slices kept at gamma=0.05; 40 of the 100 slices shown (an even sample of the kept "
                       "and the dropped); star: lesion")
    assert montage_summary(keep[:20], 20, 0.05) == "3/20 slices kept at gamma=0.05"
