"""The ``medpruner`` command end to end (subprocesses for demo, prune --json and batch), batch
resume and failure handling, and the report files (valid PNG/JSON/HTML with the reference's numbers)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import nibabel as nib
import numpy as np
import pytest
import torch
from _dicom_files import pydicom_file, write_jpeg_lossless_volume
from conftest import available_backends
from medpruner import cli
from medpruner.cli import models as cli_models
from medpruner.cli import prune as prune_module
from medpruner.volume import VolumeError, load_volume, normalize, to_model_range
from PIL import Image

from medpruner_kernels import _validation, reference


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is a test dependency"
    return Path(next(iter(spec.submodule_search_locations)))


ANATOMICAL = _package_dir("nibabel") / "tests" / "data" / "anatomical.nii"
EXAMPLE4D = _package_dir("nibabel") / "tests" / "data" / "example4d.nii.gz"
CT5N = _package_dir("pydicom") / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medpruner.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ),
        timeout=300,
    )


def _reference(source, gamma: float, window="auto", **load_kwargs):
    """Keep mask and distances of the float64 reference IAF on the same [-1, 1] slices the CLI uses."""
    slices, _ = normalize(load_volume(source, **load_kwargs), window)
    signed = torch.from_numpy(to_model_range(slices).astype(np.float64)).reshape(slices.shape[0], -1)
    keep, dist = reference.iaf_select(signed, gamma, torch.tensor([0, slices.shape[0]], dtype=torch.int32))
    return keep.numpy(), dist.numpy()


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] > 200 and image.size[1] > 100


def _volume_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for index in range(count):
        # Slowly drifting slices with a few jumps: IAF keeps some and drops others.
        base = rng.random((24, 24))
        steps = rng.normal(0, 0.01, size=(12, 24, 24)).cumsum(axis=0)
        data = (base + steps).astype(np.float32)
        data[6:] += 0.5
        path = folder / f"vol{index}.npy"
        np.save(path, data)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- subprocess
def test_prune_nifti_json_matches_the_reference(tmp_path):
    done = _run("prune", str(ANATOMICAL), "--json", "--gamma", "0.05", "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    keep, dist = _reference(ANATOMICAL, 0.05)
    result = record["result"]
    assert result["keep"] == keep.tolist()
    assert result["kept"] == int(keep.sum()) and result["num_slices"] == 25
    assert result["kept_indices"] == np.flatnonzero(keep).tolist()
    assert result["retention"] == pytest.approx(keep.mean())
    np.testing.assert_allclose(result["distance_to_anchor"], dist, atol=2e-5)
    assert record["config"]["window"]["kind"] == "percentile"
    assert record["volume"]["slice_axis"] == 2
    assert set(record["timings_s"]) >= {"load", "window", "iaf", "report"}
    assert record["environment"]["backend"] in ("cpp", "torch", "triton")

    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["result"]["keep"] == keep.tolist()
    assert saved["config"]["gamma"] == 0.05
    assert sorted(saved["files"]) == ["distances.png", "montage.png", "report.html", "report.json"]
    for name in ("montage.png", "distances.png"):
        _assert_png(tmp_path / "report" / name)
    html_text = (tmp_path / "report" / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 2
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]


def test_demo_runs_the_checkpoint_on_a_synthetic_volume_with_lesions(tmp_path):
    from medpruner.synthetic import demo_volume

    volume = demo_volume()
    done = _run("demo", "--out", str(tmp_path / "demo"), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert Path(record["volume"]["source"]) == tmp_path / "demo" / "synthetic-volume.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "demo" / "synthetic-volume.npy"), volume.data)
    depth = volume.depth
    assert record["volume"]["shape"] == list(volume.data.shape)
    assert record["config"]["demo"] is True and record["config"]["synthetic_volume"] == volume.volume_id
    # Not MR, no Hounsfield window: a synthetic CT-like volume already in [0, 1]; its geometry assumed.
    assert record["volume"]["modality"] == "synthetic (CT-like, intensities in [0, 1])"
    assert record["config"]["window"] == {"kind": "unit", "name": "unit"}
    assert record["volume"]["assumed"] == ["spacing", "orientation"]
    result, tokens = record["result"], record["tokens"]
    assert tokens["family"] == "qwen3_vl" and tokens["mode"] == "fast" and tokens["tau"] == 0.9
    assert tokens["prompt"] == "Is there a lesion? Answer yes or no."
    assert tokens["generated_text"] in ("yes", "no")
    # The model's own IAF and the report's agree slice for slice: dropped slices have no tokens.
    per_slice = np.asarray(tokens["tokens_per_slice"])
    assert per_slice.size == depth and ((per_slice > 0) == np.asarray(result["keep"])).all()
    assert tokens["slices_kept"] == tokens["slices_encoded"] == result["kept"]
    assert 0 < result["kept"] < depth
    assert per_slice.sum() == tokens["tokens_after"] < tokens["tokens_before"] == depth * 4  # 64 px / 32 = 2 x 2
    assert tokens["token_retention"] == pytest.approx(tokens["tokens_after"] / tokens["tokens_before"])
    # The heatmaps show the kept lesion slices first, and the trained attention is on the lesions.
    focus = record["lesion_focus"]
    lesion_slices = set(focus["lesion_slices"])
    assert lesion_slices == set(np.flatnonzero(volume.mask.any(axis=(1, 2))).tolist())
    assert focus["heatmap_lesion_slices"] == sorted(set(focus["lesion_slices_kept_by_iaf"]))[:8]
    assert focus["heatmap_lesion_slices"], "IAF kept no lesion slice of the demo volume"
    assert focus["importance_share"] > focus["area_share"] + 0.1
    assert [lesion["cls"] for lesion in focus["lesions"]] == [lesion.cls for lesion in volume.lesions]
    for name in ("montage.png", "distances.png", "tokens.png"):
        _assert_png(tmp_path / "demo" / name)
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["tokens"]["tokens_per_slice"] == tokens["tokens_per_slice"]
    assert saved["result"]["keep"] == result["keep"] and saved["lesion_focus"] == focus
    table = (tmp_path / "demo" / "report.html").read_text().split("<figure")[0]
    assert "{&#x27;" not in table and "HU" not in table and "1 x 1 x 1 (assumed" in table
    # the heatmaps: the kept lesion slices first, then the others; the page shows prompt, answer, lesions
    shown = focus["heatmap_slices"]
    lesions_shown = focus["heatmap_lesion_slices"]
    assert shown[: len(lesions_shown)] == lesions_shown and not set(shown[len(lesions_shown):]) & lesion_slices
    assert "<th>prompt</th><td>Is there a lesion? Answer yes or no.</td>" in table
    assert f"<th>answer</th><td>{tokens['generated_text']}</td>" in table
    kept_lesions = focus["lesion_slices_kept_by_iaf"]
    assert f"<th>lesion slices kept by IAF</th><td>{len(kept_lesions)}/{len(lesion_slices)} " in table
    assert "<th>attention on lesion tokens</th>" in table


def test_demo_with_a_local_checkpoint_runs_on_the_bundled_mri(tmp_path):
    from medpruner.checkpoints import load_tiny_vqa

    model, processor = load_tiny_vqa()
    model.save_pretrained(tmp_path / "ckpt")
    processor.image_processor.save_pretrained(tmp_path / "ckpt")
    processor.tokenizer.save_pretrained(tmp_path / "ckpt")
    done = _run("demo", "--model", str(tmp_path / "ckpt"), "--resolution", "64", "--out", str(tmp_path / "demo"),
                "--json", "--no-html")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert Path(record["volume"]["source"]) == cli.demo_volume_path()
    assert record["volume"]["shape"][0] == len(record["result"]["keep"])
    assert record["tokens"]["prompt"] == cli.DEFAULT_PROMPT and "lesion_focus" not in record
    assert record["tokens"]["slice_size"] == [64, 64]


def test_lesion_focus_against_a_loop_reference():
    from medpruner.cli.demo import lesion_focus

    rng = np.random.default_rng(3)
    token_lesion = rng.random((5, 4)) < 0.3
    token_lesion[1] = False
    token_lesion[3, 0] = True
    shown = [0, 1, 3]
    importance = [rng.random(4).tolist() for _ in shown]
    keep = [(rng.random(4) < 0.5).tolist() for _ in shown]
    tokens = cli.TokenResult({}, {}, shown, [np.asarray(row) for row in importance],
                             [np.asarray(row) for row in keep], (2, 2))
    got = lesion_focus(tokens, [True, True, False, True, True], token_lesion)
    on, total, lesion_kept, lesion_n, other_kept, other_n = 0.0, 0.0, 0, 0, 0, 0
    for s, scores, kept in zip(shown, importance, keep, strict=True):
        if not token_lesion[s].any():
            continue
        for t in range(4):
            total += scores[t]
            if token_lesion[s, t]:
                on += scores[t]
                lesion_n += 1
                lesion_kept += kept[t]
            else:
                other_n += 1
                other_kept += kept[t]
    assert got["heatmap_lesion_slices"] == [s for s in shown if token_lesion[s].any()]
    assert got["importance_share"] == pytest.approx(on / total)
    assert got["area_share"] == pytest.approx(lesion_n / (lesion_n + other_n))
    assert got["lesion_tokens_kept"] == pytest.approx(lesion_kept / lesion_n)
    assert got["background_tokens_kept"] == pytest.approx(other_kept / other_n)
    assert got["lesion_slices_kept_by_iaf"] == [s for s in np.flatnonzero(token_lesion.any(1)) if s != 2]


def test_batch_survives_a_bad_file_and_resumes(tmp_path):
    inputs = tmp_path / "inputs"
    good = _volume_files(inputs, 3)
    corrupt = inputs / "broken.nii.gz"
    corrupt.write_bytes(EXAMPLE4D.read_bytes()[:3000])
    out = tmp_path / "out"

    done = _run("prune", str(inputs), "--out", str(out), "--json", "--gamma", "0.1")
    assert done.returncode == 1, done.stderr
    assert "broken.nii.gz" in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["processed"], summary["failed"], summary["already_done"]) == (3, 1, 0)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    by_source = {entry["source"]: entry for entry in lines}
    assert by_source[str(corrupt.resolve())]["status"] == "error"
    assert "broken.nii.gz" in by_source[str(corrupt.resolve())]["error"]
    for path in good:
        entry = by_source[str(path.resolve())]
        keep, _ = _reference(path, 0.1)
        assert entry["status"] == "ok"
        assert entry["kept_indices"] == np.flatnonzero(keep).tolist()
        assert entry["kept"] == int(keep.sum()) and entry["num_slices"] == 12

    # Resume: the three good volumes are skipped; the bad one, unchanged, is not tried again (still an
    # error: status 1); with --retry-failed it is tried again and fails again. One line per source.
    assert cli.main(["prune", str(inputs), "--out", str(out), "--gamma", "0.1"]) == 1
    assert (out / "results.jsonl").read_text().splitlines() == [json.dumps(e) for e in lines]
    assert cli.main(["prune", str(inputs), "--out", str(out), "--gamma", "0.1", "--retry-failed"]) == 1
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {**by_source[str(corrupt.resolve())], "error": ANY}

    # A line cut off by a crash is dropped, the file repaired, and that volume redone.
    corrupt.unlink()
    redo = str(good[1].resolve())
    kept_lines = [line for line in lines if json.loads(line)["source"] != redo]
    (out / "results.jsonl").write_text("\n".join(kept_lines) + "\n" + '{"source": "' + redo[:10])
    assert cli.main(["prune", str(inputs), "--out", str(out), "--gamma", "0.1"]) == 0
    entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(1 for e in entries if e["source"] == redo and e["status"] == "ok") == 1
    assert cli.main(["prune", str(inputs / "*.npy"), "--out", str(out), "--gamma", "0.1"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(entries)


def test_batch_resume_redoes_volumes_under_new_settings_or_edited_files(tmp_path, capsys):
    paths = _volume_files(tmp_path / "inputs", 3)
    out = tmp_path / "out"

    def run(*extra):
        assert cli.main(["prune", str(tmp_path / "inputs"), "--out", str(out), "--json", *extra]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        current = {}
        for line in (out / "results.jsonl").read_text().splitlines():
            entry = json.loads(line)
            current[entry["source"]] = entry
        return (summary["processed"], summary["already_done"]), current

    assert run("--gamma", "0.1")[0] == (3, 0)
    assert run("--gamma", "0.1")[0] == (0, 3)
    # Another gamma: every line recorded under 0.1 is stale, and the new lines follow the new gamma.
    counts, current = run("--gamma", "0.3")
    assert counts == (3, 0)
    for path in paths:
        entry = current[str(path.resolve())]
        keep, _ = _reference(path, 0.3)
        assert entry["settings"]["gamma"] == 0.3 and entry["kept_indices"] == np.flatnonzero(keep).tolist()
    assert run("--gamma", "0.3", "--window", "percentile")[0] == (3, 0)
    # An edited file (a slice more) is done again; the others are not.
    np.save(paths[1], np.concatenate([np.load(paths[1]), np.load(paths[1])[-1:]]))
    counts, current = run("--gamma", "0.3", "--window", "percentile")
    assert counts == (1, 2)
    assert current[str(paths[1].resolve())]["num_slices"] == 13


# -------------------------------------------------------------------------------------- in-process
def test_prune_dicom_series_uses_its_window(capsys):
    assert cli.main(["prune", str(CT5N), "--json", "--backend", "torch"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["window"] == {"kind": "ct", "name": "dicom", "level": 40.0, "width": 400.0}
    assert record["volume"]["modality"] == "CT" and record["result"]["num_slices"] == 5
    assert record["environment"]["backend"] == "torch"


def test_prune_summary_text_and_window_preset(capsys):
    # A negative level needs the --window=L,W form (argparse takes "-100,600" for an option).
    assert cli.main(["prune", str(ANATOMICAL), "--window=-100,600", "--slice-axis", "0"]) == 0
    text = capsys.readouterr().out
    assert "kept" in text and "/33 slices" in text and "level -100, width 600 HU" in text
    assert "slice axis 0: given by the caller" in text


def test_errors_are_clear(tmp_path, capsys):
    assert cli.main(["prune", str(tmp_path / "nothing.nii.gz")]) == 1
    assert "nothing.nii.gz: no such file" in capsys.readouterr().err
    assert cli.main(["prune", str(ANATOMICAL), "--model", str(tmp_path / "absent")]) == 2
    assert "absent: not a folder" in capsys.readouterr().err
    assert cli.main(["prune", str(ANATOMICAL), "--model", str(tmp_path)]) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", str(ANATOMICAL), "--tau", "0"])
    assert "argument --tau: tau must be a finite number > 0 (tau >= 1 keeps every token), got 0.0" in (
        capsys.readouterr().err
    )
    assert cli.main(["prune", str(ANATOMICAL), "--tau", "0.5", "--mode", "paper"]) == 2
    assert "--tau, --mode: token-level options need --model" in capsys.readouterr().err
    assert cli.main(["prune", str(tmp_path / "*.nii")]) == 2
    assert "matches nothing" in capsys.readouterr().err
    _volume_files(tmp_path / "many", 2)
    assert cli.main(["prune", str(tmp_path / "many")]) == 2
    assert "need --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", str(ANATOMICAL), "--window", "liver"])
    assert exit_info.value.code == 2
    assert "unknown 'liver'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prune", str(ANATOMICAL), "--gamma", "nan"])


def test_inputs_expand_to_series_folders_files_and_globs(tmp_path):
    assert cli.expand_inputs([str(CT5N)]) == ([CT5N], False)
    paths = _volume_files(tmp_path / "vols", 2)
    (tmp_path / "vols" / "series").mkdir()
    found, batch = cli.expand_inputs([str(tmp_path / "vols")])
    assert batch and found == sorted([*paths, tmp_path / "vols" / "series"])
    assert cli.expand_inputs([str(tmp_path / "vols" / "*.npy")]) == (paths, True)
    assert cli.expand_inputs([str(paths[0])]) == ([paths[0]], False)


def test_bench_without_and_with_a_bench_folder(tmp_path, capsys):
    assert cli.main(["bench", "--bench-dir", str(tmp_path / "absent")]) == 1
    assert "no bench/ folder found" in capsys.readouterr().err
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_tiny.py").write_text("def test_sum(benchmark):\n    benchmark(sum, range(10))\n")
    assert cli.main(["bench", "--bench-dir", str(bench), "--benchmark-disable-gc"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["group", "benchmark", "median", "ms", "min", "ms", "rounds", "floor", "x", "speedup"]
    # a group without an eager baseline has no speedup to show
    assert table[2].split()[0] == "test_sum" and table[2].split()[-1] == "-"


def test_bench_table_reports_speedup_over_the_slowest_of_a_group():
    rows = cli.bench_rows(
        {
            "benchmarks": [
                {
                    "group": "iaf",
                    "name": "eager",
                    "stats": {"median": 0.010, "mean": 0.011, "min": 0.009, "rounds": 5},
                },
                {
                    "group": "iaf",
                    "name": "cpp",
                    "stats": {"median": 0.002, "mean": 0.002, "min": 0.002, "rounds": 9},
                },
            ]
        }
    )
    assert [round(r["median_ms"], 6) for r in rows] == [10.0, 2.0]
    lines = cli.bench_table(rows).splitlines()
    assert lines[2].split()[-1] == "1.0x" and lines[3].split()[-1] == "5.0x"


def test_nifti_written_by_nibabel_prunes_like_the_reference(tmp_path):
    data = np.repeat(np.random.default_rng(5).random((1, 20, 16)), 10, axis=0)
    data[5:] += 0.3
    path = tmp_path / "steps.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(data, (2, 1, 0)).astype(np.float32), np.eye(4)), path)
    record = cli.prune_one(
        path,
        gamma=0.05,
        window="percentile",
        slice_axis=None,
        frame=None,
        backend="auto",
        device="cpu",
        out_dir=None,
    )
    keep, _ = _reference(path, 0.05, slice_axis=None)
    assert record["result"]["keep"] == keep.tolist()
    assert record["result"]["kept_indices"] == [0, 5]


# ------------------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def tiny_bundle():
    pytest.importorskip("transformers")
    return cli.tiny_qwen3_vl(torch.device("cpu"))


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_prune_with_a_model_matches_the_reference_on_its_pixels(tmp_path, tiny_bundle, mode):
    tokens = cli.TokenOptions(
        bundle=tiny_bundle,
        tau=0.5,
        mode=mode,
        merge=True,
        prompt="Describe.",
        resolution=64,
        max_new_tokens=2,
    )
    record = cli.prune_one(
        ANATOMICAL,
        gamma=0.2,
        window="percentile",
        slice_axis=None,
        frame=None,
        backend="torch",
        device="cpu",
        out_dir=tmp_path / "report",
        tokens=tokens,
    )
    # The report's slice decisions are the float64 reference IAF on the model's own pixel tensor.
    slices, _ = normalize(load_volume(ANATOMICAL), "percentile")
    resized = cli.model_slices(slices, 64, tiny_bundle.size_multiple)
    assert resized.shape[1:] == (64, 48) and record["tokens"]["slice_size"] == [64, 48]
    pixels = cli.model_inputs(tiny_bundle, resized, "Describe.")["pixel_values"]
    flat = pixels.to(torch.float64).reshape(25, -1)
    keep, dist = reference.iaf_select(flat, 0.2, torch.tensor([0, 25], dtype=torch.int32))
    result, stats = record["result"], record["tokens"]
    assert result["keep"] == keep.tolist()
    np.testing.assert_allclose(result["distance_to_anchor"], dist.numpy(), atol=2e-5)

    per_slice = np.asarray(stats["tokens_per_slice"])
    dropped = ~keep.numpy()
    assert dropped.any() and keep.numpy().sum() > 1
    # fast: a dropped slice is never encoded; paper: it keeps its first token.
    assert (per_slice[dropped] == (0 if mode == "fast" else 1)).all()
    assert (per_slice[~dropped] >= 1).all() and (per_slice <= 12).all()
    assert stats["slices_encoded"] == (int(keep.sum()) if mode == "fast" else 25)
    assert per_slice.sum() == stats["tokens_after"] and stats["tokens_before"] == 25 * 12
    assert stats["token_grid"] == [4, 3]
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["tokens"] == json.loads(json.dumps(stats))
    assert "tokens.png" in saved["files"]
    _assert_png(tmp_path / "report" / "tokens.png")
    html_text = (tmp_path / "report" / "report.html").read_text()
    assert html_text.count("data:image/png;base64,") == 3 and "token retention" in html_text


def test_batch_with_a_model_records_tokens_per_volume(tmp_path, tiny_bundle, capsys):
    paths = _volume_files(tmp_path / "inputs", 2)
    tokens = cli.TokenOptions(
        bundle=tiny_bundle,
        tau=0.9,
        mode="fast",
        merge=False,
        prompt="Describe.",
        resolution=32,
        max_new_tokens=1,
    )
    status = cli.prune_batch(
        paths,
        out_dir=tmp_path / "out",
        gamma=0.1,
        window="percentile",
        slice_axis=None,
        frame=None,
        backend="torch",
        device="cpu",
        workers=2,
        as_json=True,
        tokens=tokens,
    )
    assert status == 0
    assert json.loads(capsys.readouterr().out)["processed"] == 2
    entries = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [e["source"] for e in entries] == [str(p.resolve()) for p in paths]
    for entry in entries:
        per_slice = np.asarray(entry["tokens"]["tokens_per_slice"])
        kept = np.zeros(12, dtype=bool)
        kept[entry["kept_indices"]] = True
        # Without the merge every kept slice keeps its nucleus only; dropped slices have no tokens.
        assert ((per_slice > 0) == kept).all() and entry["tokens"]["merge"] is False
        assert (
            entry["tokens"]["tokens_before"] == 12 * 4 and per_slice.sum() == entry["tokens"]["tokens_after"]
        )


def test_prune_loads_a_local_checkpoint(tmp_path, tiny_bundle, capsys):
    checkpoint = tmp_path / "checkpoint"
    tiny_bundle.model.save_pretrained(checkpoint)
    tiny_bundle.processor.image_processor.save_pretrained(checkpoint)
    tiny_bundle.processor.tokenizer.save_pretrained(checkpoint)
    argv = ["prune", str(ANATOMICAL), "--model", str(checkpoint), "--json", "--gamma", "0.2"]
    argv += ["--resolution", "64", "--max-new-tokens", "1", "--backend", "torch", "--mode", "paper"]
    assert cli.main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    tokens = record["tokens"]
    assert tokens["model"] == str(checkpoint) and tokens["family"] == "qwen3_vl" and tokens["mode"] == "paper"
    assert tokens["slices_encoded"] == 25 and tokens["slice_size"] == [64, 48]
    assert record["result"]["tokens_per_slice"] == tokens["tokens_per_slice"]


def test_heatmaps_hold_each_kept_slice_attention_scores(tiny_bundle):
    slices, _ = normalize(load_volume(ANATOMICAL), "percentile")
    resized = cli.model_slices(slices, 64, tiny_bundle.size_multiple)
    inputs = cli.model_inputs(tiny_bundle, resized, "Describe.")
    flat = inputs["pixel_values"].to(torch.float64).reshape(25, -1)
    keep, _ = reference.iaf_select(flat, 0.2, torch.tensor([0, 25], dtype=torch.int32))
    run = cli.run_model(
        tiny_bundle,
        inputs,
        keep.numpy(),
        gamma=0.2,
        tau=0.5,
        mode="fast",
        merge=False,
        backend="torch",
        prompt="Describe.",
        max_new_tokens=1,
        max_heatmaps=4,
    )
    kept = np.flatnonzero(keep.numpy())
    assert len(run.heatmap_slices) == 4 and set(run.heatmap_slices) <= set(kept.tolist())
    assert run.heatmap_slices[0] == 0 and run.heatmap_slices[-1] == kept[-1] and run.grid == (4, 3)
    per_slice = run.record["tokens_per_slice"]
    for index, scores, token_keep in zip(run.heatmap_slices, run.importance, run.keep):
        # Attention received, summed over a slice's queries and averaged over 2x2 merge groups, adds
        # up to the slice's token count; without the merge the kept tokens are its nucleus.
        assert scores.shape == (12,) and scores.sum() == pytest.approx(12.0, rel=1e-4)
        assert token_keep.sum() == per_slice[index]
        assert scores[token_keep].min() >= scores[~token_keep].max(initial=-np.inf)


# -------------------------------------------------------------------------------- compressed DICOM
@pytest.mark.parametrize(
    "compressed, plain",
    [
        ("JPEG-LL.dcm", None),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_prune_reads_compressed_dicom(compressed, plain, capsys):
    path = pydicom_file(compressed)
    assert cli.main(["prune", str(path), "--json", "--gamma", "0.05"]) == 0
    record = json.loads(capsys.readouterr().out)
    # The uncompressed twin, where pydicom-data has one, gives a reference that no JPEG decoder made.
    keep, dist = _reference(path if plain is None else pydicom_file(plain), 0.05)
    assert record["volume"]["shape"][0] == keep.size and record["result"]["keep"] == keep.tolist()
    np.testing.assert_allclose(record["result"]["distance_to_anchor"], dist, atol=2e-5)


def test_prune_jpeg_lossless_volume_matches_its_stored_values(tmp_path, capsys):
    # Drifting slices with a jump, in stored values that CT_small's header (intercept -1024) puts in the
    # abdomen window's -160..240 HU.
    rng = np.random.default_rng(8)
    stored = 900 + rng.random((32, 32)) * 250 + rng.normal(0, 6, size=(10, 32, 32)).cumsum(axis=0)
    stored = stored.astype(np.int16)
    stored[6:] += 150
    path = write_jpeg_lossless_volume(tmp_path / "ct.dcm", pydicom_file("CT_small.dcm"), stored)
    assert cli.main(["prune", str(path), "--json", "--gamma", "0.05", "--window", "abdomen"]) == 0
    record = json.loads(capsys.readouterr().out)
    keep, dist = _reference(stored.astype(np.float32) - 1024.0, 0.05, window="abdomen")
    assert record["volume"]["modality"] == "CT" and record["result"]["keep"] == keep.tolist()
    assert 1 < record["result"]["kept"] < 10
    np.testing.assert_allclose(record["result"]["distance_to_anchor"], dist, atol=2e-5)


# -------------------------------------------------------------------------------- deferred errors
def _nan_volume(tmp_path, name: str) -> Path:
    data = np.random.default_rng(2).random((6, 8, 8)).astype(np.float32)
    path = tmp_path / name
    np.save(path, data)
    return path


@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
@pytest.mark.parametrize("backend", available_backends(("iaf_select",)))
def test_non_finite_slices_in_iaf_are_an_error_naming_the_volume(tmp_path, backend, deferred):
    path = _nan_volume(tmp_path, "scan.npy")
    volume = load_volume(path)
    slices, window = normalize(volume)
    slices[3, 2, 5] = np.nan
    with _validation.deferred_checks(deferred):
        with pytest.raises(VolumeError, match=r"scan\.npy: iaf_select: volume contains NaN or Inf"):
            cli.run_iaf(volume, slices, window, 0.05, backend=backend, device="cpu")
    assert _validation.pending_error_count() == 0


def _let_nan_through(monkeypatch, marker: str) -> None:
    """Windowing maps NaN voxels to 0, so no NaN read from a file reaches a kernel; this puts one back
    into the slices of files whose name holds ``marker``, to stand for an input that a kernel rejects
    only at the read (its check deferred, as on CUDA)."""
    real = prune_module.normalize

    def normalize_keeping_a_nan(volume, window="auto"):
        slices, chosen = real(volume, window)
        if marker in str(volume.source):
            slices[1, 0, 0] = np.nan
        return slices, chosen

    monkeypatch.setattr(prune_module, "normalize", normalize_keeping_a_nan)


@pytest.mark.parametrize("backend", available_backends(("iaf_select",)))
def test_a_deferred_nan_is_a_clear_command_error(tmp_path, monkeypatch, capsys, backend):
    monkeypatch.setenv("MEDPRUNER_DEFER_CHECKS", "1")
    _let_nan_through(monkeypatch, "bad")
    path = _nan_volume(tmp_path, "bad.npy")
    assert cli.main(["prune", str(path), "--backend", backend, "--out", str(tmp_path / "report")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"medpruner: error: {path}: iaf_select: volume contains NaN or Inf" + (
        " (or values whose differences overflow float32)\n"
    )
    assert captured.out == "" and not (tmp_path / "report").exists()


def test_a_deferred_nan_in_a_batch_is_an_error_line_and_the_batch_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDPRUNER_DEFER_CHECKS", "1")
    _let_nan_through(monkeypatch, "vol1")
    paths = _volume_files(tmp_path / "inputs", 3)
    out = tmp_path / "out"
    status = cli.main(["prune", str(tmp_path / "inputs"), "--out", str(out), "--backend", "torch", "--workers", "1"])
    assert status == 1
    assert "vol1.npy: iaf_select: volume contains NaN or Inf" in capsys.readouterr().err
    entries = {e["source"]: e for e in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert len(entries) == 3
    bad = entries[str(paths[1].resolve())]
    assert bad["status"] == "error" and bad["error"].startswith(f"{paths[1]}: iaf_select: volume contains NaN")
    # The volumes on either side are untouched by the bad one's queued check.
    for path in (paths[0], paths[2]):
        keep, _ = _reference(path, 0.05)
        assert entries[str(path.resolve())]["status"] == "ok"
        assert entries[str(path.resolve())]["kept_indices"] == np.flatnonzero(keep).tolist()


def test_a_gemma3_checkpoint_runs_under_the_shared_family_name(tmp_path):
    from _tiny_models import gemma_processor, tiny_gemma3

    bundle = cli_models._bundle(tiny_gemma3().eval(), gemma_processor(), "tiny Gemma3")
    assert bundle.family == "medgemma" and bundle.pixel_key == "pixel_values"
    tokens = cli.TokenOptions(
        bundle=bundle, tau=0.5, mode="fast", merge=True, prompt="Describe.", resolution=64, max_new_tokens=2
    )
    record = cli.prune_one(
        ANATOMICAL,
        gamma=0.2,
        window="percentile",
        slice_axis=None,
        frame=None,
        backend="torch",
        device="cpu",
        out_dir=None,
        tokens=tokens,
    )
    per_slice = np.asarray(record["tokens"]["tokens_per_slice"])
    assert record["tokens"]["family"] == "medgemma" and per_slice.size == 25
    assert ((per_slice > 0) == np.asarray(record["result"]["keep"])).all()
    assert 0 < record["tokens"]["tokens_after"] < record["tokens"]["tokens_before"]


def test_backend_names_come_from_the_kernels_list(capsys):
    from medpruner_kernels._dispatch import BACKENDS

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", str(ANATOMICAL), "--backend", "cuda"])
    assert exit_info.value.code == 2
    assert f"backend must be one of {', '.join(BACKENDS)}, got 'cuda'" in capsys.readouterr().err


# ------------------------------------------------------------------------- issue 25: bad input, one line
def _huge_nifti(path: Path) -> Path:
    """A NIfTI whose header claims 30000^3 float32 voxels (108 TB) over a few bytes of data."""
    header = nib.Nifti1Header()
    header["magic"] = b"n+1"
    header.set_data_offset(352)
    header.set_data_dtype(np.float32)
    header.set_data_shape((30000, 30000, 30000))
    header.set_qform(np.eye(4), code=1)
    data = header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes()
    if path.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def test_a_header_claiming_30000_cubed_voxels_is_an_error_row_and_the_batch_goes_on(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    good = _volume_files(inputs, 2)
    huge = [_huge_nifti(inputs / "huge.nii"), _huge_nifti(inputs / "huge.nii.gz")]
    out = tmp_path / "out"
    assert cli.main(["prune", str(inputs / "*"), "--out", str(out), "--json", "--workers", "1"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["processed"], summary["failed"]) == (2, 2)
    entries = {e["source"]: e for e in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    for path in huge:
        entry = entries[str(path.resolve())]
        assert entry["status"] == "error" and entry["error"].startswith(f"{path}: ")
        assert "MemoryError" not in entry["error"] and "(108,000,000,000," in entry["error"]
    for path in good:
        assert entries[str(path.resolve())]["status"] == "ok"


def test_any_exception_of_one_volume_is_an_error_row(tmp_path, monkeypatch, capsys):
    from medpruner.cli import batch as batch_module

    paths = _volume_files(tmp_path / "inputs", 3)
    real = batch_module.load_volume

    def flaky(path, **kwargs):
        if Path(path).name == "vol0.npy":
            raise MemoryError()
        if Path(path).name == "vol1.npy":
            raise KeyError("a reader bug")
        return real(path, **kwargs)

    monkeypatch.setattr(batch_module, "load_volume", flaky)
    out = tmp_path / "out"
    assert cli.main(["prune", str(tmp_path / "inputs"), "--out", str(out), "--workers", "1"]) == 1
    entries = {e["source"]: e for e in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert entries[str(paths[0].resolve())]["error"] == f"{paths[0]}: out of memory while reading or pruning it " \
        "(MemoryError)"
    assert entries[str(paths[1].resolve())]["error"] == f"{paths[1]}: KeyError: 'a reader bug'"
    keep, _ = _reference(paths[2], 0.05)
    assert entries[str(paths[2].resolve())]["kept_indices"] == np.flatnonzero(keep).tolist()


def _write(path: Path, data: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, data.astype(np.float32))
    return path


def test_an_all_nan_volume_is_refused_in_one_line_and_as_an_error_row(tmp_path, capsys):
    bad = _write(tmp_path / "inputs" / "nan.npy", np.full((4, 8, 8), np.nan))
    _write(tmp_path / "inputs" / "inf.npy", np.full((4, 8, 8), -np.inf))
    assert cli.main(["prune", str(bad), "--out", str(tmp_path / "report")]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"medpruner: error: {bad}: no finite voxel value: all 256 voxels are NaN or Inf\n"
    assert captured.out == "" and not (tmp_path / "report").exists()
    out = tmp_path / "out"
    assert cli.main(["prune", str(tmp_path / "inputs"), "--out", str(out)]) == 1
    entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(Path(e["source"]).name, e["status"]) for e in entries] == [("inf.npy", "error"), ("nan.npy", "error")]
    assert all("no finite voxel value" in e["error"] for e in entries)


def test_partial_nan_and_inf_follow_the_stated_policy_everywhere(tmp_path, capsys):
    rng = np.random.default_rng(5)
    data = rng.random((6, 10, 10)).astype(np.float32) * 100.0
    data[1, 2, 3] = np.nan
    data[2, 0, :4] = np.inf
    data[4] = -np.inf  # a whole slice: must not make the volume CT (air is -1000 HU)
    path = _write(tmp_path / "scan.npy", data)
    # The policy by hand: NaN and -Inf -> the finite minimum, +Inf -> the finite maximum.
    finite = data[np.isfinite(data)]
    expected = data.copy()
    expected[np.isnan(data) | np.isneginf(data)] = finite.min()
    expected[np.isposinf(data)] = finite.max()
    keep, _ = _reference(expected, 0.05, window="percentile")

    assert cli.main(["prune", str(path), "--out", str(tmp_path / "report")]) == 0
    text = capsys.readouterr().out
    assert "warning    1 NaN, 4 +Inf, 100 -Inf of 600 voxels replaced before windowing: NaN -> the finite " \
        "minimum, +Inf -> the finite maximum, -Inf -> the finite minimum" in text
    record = json.loads((tmp_path / "report" / "report.json").read_text())
    assert record["volume"]["modality"] == "MR" and record["config"]["window"]["kind"] == "percentile"
    assert record["volume"]["nonfinite"]["nan"] == 1 and record["volume"]["nonfinite"]["posinf"] == 4
    assert record["volume"]["nonfinite"]["neginf"] == 100
    assert record["result"]["keep"] == keep.tolist()
    page = (tmp_path / "report" / "report.html").read_text()
    assert "non-finite voxels" in page and "NaN -&gt; the finite minimum" in page

    out = tmp_path / "out"
    assert cli.main(["prune", str(path), str(_write(tmp_path / "b.npy", expected)), "--out", str(out)]) == 0
    rows = {Path(e["source"]).name: e for e in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["scan.npy"]["nonfinite"] == record["volume"]["nonfinite"] and rows["b.npy"]["nonfinite"] is None
    assert rows["scan.npy"]["kept_indices"] == rows["b.npy"]["kept_indices"] == np.flatnonzero(keep).tolist()


def test_a_constant_volume_is_a_warning_not_an_error(tmp_path, capsys):
    path = _write(tmp_path / "flat.npy", np.full((5, 8, 8), 7.0))
    assert cli.main(["prune", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["volume"]["constant"] is True and record["result"]["kept_indices"] == [0]
    assert cli.main(["prune", str(path)]) == 0
    assert "warning    constant volume" in capsys.readouterr().out
    other = _write(tmp_path / "varied.npy", np.arange(5 * 64).reshape(5, 8, 8))
    assert cli.main(["prune", str(other), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["volume"]["constant"] is False


@pytest.mark.parametrize("command", ["one", "batch", "demo"])
def test_an_unusable_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, command):
    from medpruner.cli import demo as demo_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(cli_models, "load_model", no_work)
    monkeypatch.setattr(demo_module, "tiny_vqa", no_work)
    monkeypatch.setattr(prune_module, "load_volume", no_work)
    _volume_files(tmp_path / "inputs", 2)
    argv = {
        "one": ["prune", str(tmp_path / "inputs" / "vol0.npy")],
        "batch": ["prune", str(tmp_path / "inputs")],
        "demo": ["demo"],
    }[command]
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    cases = [
        (a_file, f"--out {a_file}: exists and is not a folder"),
        (a_file / "sub", f"--out {a_file / 'sub'}: cannot create the folder ({a_file} is a file)"),
    ]
    if Path("/proc/self").is_dir():
        # Not writable even by root.
        cases.append((Path("/proc/medpruner-out"), "--out /proc/medpruner-out: cannot create the folder (in /proc)"))
    for out, message in cases:
        assert cli.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"medpruner: error: {message}") and err.count("\n") == 1
    assert a_file.read_text() == "x" and not (tmp_path / "taken.txt" / "sub").exists()


def test_check_output_dir_accepts_new_and_existing_folders_and_creates_nothing(tmp_path):
    from medpruner.cli.common import check_output_dir

    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert sorted(tmp_path.iterdir()) == []


def test_backend_triton_without_triton_is_one_line(monkeypatch, capsys):
    from medpruner_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", False)
    assert cli.main(["prune", str(ANATOMICAL), "--backend", "triton"]) == 2
    assert capsys.readouterr().err == (
        "medpruner: error: --backend triton: iaf_select: backend='triton' needs the triton package "
        "(pip install triton)\n"
    )


def test_ctrl_c_in_a_batch_saves_the_rows_done_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    from medpruner.cli import batch as batch_module

    paths = _volume_files(tmp_path / "inputs", 4)
    real = batch_module.prune_loaded
    calls = []

    def interrupted_at_the_third(volume, *args, **kwargs):
        calls.append(volume.source)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(volume, *args, **kwargs)

    monkeypatch.setattr(batch_module, "prune_loaded", interrupted_at_the_third)
    out = tmp_path / "out"
    argv = ["prune", str(tmp_path / "inputs"), "--out", str(out), "--workers", "1"]
    assert cli.main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == (
        f"medpruner: interrupted: 2 volume(s) of this run saved (2 line(s) in {out / 'results.jsonl'}); "
        "2 not done; rerun the same command to resume\n"
    )
    done = [json.loads(line)["source"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert done == [str(p.resolve()) for p in paths[:2]]
    monkeypatch.setattr(batch_module, "prune_loaded", real)
    assert cli.main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["processed"], summary["already_done"]) == (2, 2)


def test_ctrl_c_in_one_volume_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_module, "write_report", interrupt)
    assert cli.main(["prune", str(ANATOMICAL), "--out", str(tmp_path / "r")]) == 130
    captured = capsys.readouterr()
    assert captured.err.startswith("medpruner: interrupted: nothing of this prune was saved")
    assert captured.err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_reruns_keep_one_line_per_source_and_retry_failures_only_when_changed(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    good = _volume_files(inputs, 3)
    bad = [inputs / "bad0.npy", inputs / "bad1.npy"]
    for path in bad:
        path.write_bytes(b"\x93NUMPY not really")
    out = tmp_path / "out"
    argv = ["prune", str(inputs), "--out", str(out), "--json", "--workers", "1"]

    def run(*extra):
        status = cli.main([*argv, *extra])
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        entries = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert sorted(e["source"] for e in entries) == sorted(str(p.resolve()) for p in [*good, *bad])
        return status, (summary["processed"], summary["already_done"], summary["failed"], summary["failed_before"])

    assert run() == (1, (3, 0, 2, 0))
    assert run() == (1, (0, 3, 0, 2))
    assert run() == (1, (0, 3, 0, 2))
    assert run("--retry-failed") == (1, (0, 3, 2, 0))
    # An edited bad file is tried again (and now works); the other one stays recorded, not retried.
    np.save(bad[0], np.load(good[0]))
    assert run() == (1, (1, 3, 0, 1))
    # Other settings: every source is done again, still one line each.
    assert run("--gamma", "0.2") == (1, (4, 0, 1, 0))
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]


def test_compact_results_keeps_the_last_line_of_each_source(tmp_path):
    from medpruner.cli.batch import compact_results

    results = tmp_path / "results.jsonl"
    lines = [{"source": "a", "n": 1}, {"source": "b", "n": 2}, {"source": "a", "n": 3}, {"source": "c", "n": 4}]
    results.write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"source": "b", "n"')
    assert compact_results(results) == 3
    assert [json.loads(line) for line in results.read_text().splitlines()] == [
        {"source": "a", "n": 3}, {"source": "b", "n": 2}, {"source": "c", "n": 4}
    ]


def test_messages_name_cli_options_and_never_advise_allow_pickle(tmp_path, capsys):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 4, 4)), b=np.ones((2, 4, 4)))
    assert cli.main(["prune", str(tmp_path / "two.npz")]) == 1
    assert "choose one with --key NAME" in capsys.readouterr().err
    assert cli.main(["prune", str(tmp_path / "two.npz"), "--key", "b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["volume"]["shape"] == [2, 4, 4]
    assert cli.main(["prune", str(EXAMPLE4D)]) == 1
    assert "choose one with --frame N" in capsys.readouterr().err
    assert cli.main(["prune", str(EXAMPLE4D), "--frame", "1", "--json"]) == 0
    capsys.readouterr()
    (tmp_path / "junk.npy").write_bytes(b"this is not numpy at all")
    assert cli.main(["prune", str(tmp_path / "junk.npy")]) == 1
    err = capsys.readouterr().err
    assert err == f"medpruner: error: {tmp_path / 'junk.npy'}: not a numeric array: the file holds Python " \
        "objects (pickled data), which are never loaded\n"


@pytest.mark.parametrize("text", ["-1", "-0.01", "2.01", "5", "inf", "nan"])
def test_gamma_outside_0_2_is_refused_naming_the_option(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", str(ANATOMICAL), f"--gamma={text}"])
    assert exit_info.value.code == 2
    assert "argument --gamma: gamma must be in [0, 2]" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "2", "0.05"])
def test_gamma_inside_0_2_is_accepted(text):
    assert cli.build_parser().parse_args(["prune", "x", "--gamma", text]).gamma == float(text)


@pytest.mark.parametrize("text", ["0.5", "1", "1.5", "100", "0", "-0.5", "nan", "inf", "-inf"])
def test_cli_tau_accepts_exactly_what_the_api_accepts(text):
    import medpruner_kernels

    scores = torch.rand(2, 6)
    try:
        medpruner_kernels.nucleus_select(scores, float(text), backend="torch")
        api = True
    except ValueError:
        api = False
    try:
        cli.build_parser().parse_args(["prune", "x", "--tau", text])
        command = True
    except SystemExit:
        command = False
    assert command == api


def test_tau_above_one_keeps_every_token_with_the_shipped_checkpoint(capsys):
    assert cli.main(["prune", str(ANATOMICAL), "--model", "tiny-vqa", "--tau", "1.5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    tokens = record["tokens"]
    assert tokens["model"] == cli_models.TINY_VQA_NAME and tokens["tau"] == 1.5
    assert tokens["slice_size"] == [64, 64] or max(tokens["slice_size"]) == 64
    kept = record["result"]["kept"]
    assert tokens["tokens_after"] == kept * (tokens["tokens_before"] // record["result"]["num_slices"])


def test_version_prints_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"medpruner {metadata.version('medpruner-kernels')}\n"
