"""``medpruner prune|eval --engine ray``: the Ray Data jobs on a 2-node local cluster (one session for
the module) give the single-process lines and records, survive bad files and a killed actor, resume."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Data is not installed (pip install 'ray[data]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")

import medpruner.cli as cli  # noqa: E402
from medpruner.cli.eval import eval_model  # noqa: E402
from medpruner.distributed import (  # noqa: E402
    EvalModelRef,
    EvalStage,
    ModelRef,
    ModelStage,
    RayOptions,
    eval_job,
    prune_job,
    read_manifest,
)
from medpruner.distributed.shards import ShardWriter, shard_files  # noqa: E402
from medpruner.eval.readers import read_dataset  # noqa: E402
from medpruner.eval.runner import RECORDS_NAME, EvalSettings, read_records, record_files, run_eval  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

# local Ray clusters start in seconds each: skip with -m "not slow" locally; CI runs them
pytestmark = pytest.mark.slow

GOOD, GAMMA = 18, 0.1
RUN = dict(gamma=GAMMA, window="percentile", slice_axis=None, frame=None, backend="torch", device="cpu")
TOKENS = dict(tau=0.9, mode="fast", merge=True, prompt="Describe.", resolution=32, max_new_tokens=1)


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 80 * 2**20}
    )
    nodes.add_node(num_cpus=2, object_store_memory=80 * 2**20)
    ray.init(address=nodes.address, log_to_driver=False)
    # The crashing stage below is defined here: its class travels by value to the cluster's workers.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield nodes
    ray.shutdown()
    nodes.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> list[Path]:
    """18 small volumes (drifting slices with one jump: IAF keeps some) and two bad files."""
    folder = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(7)
    paths = []
    for index in range(GOOD):
        data = (rng.random((24, 24)) + rng.normal(0, 0.01, size=(12, 24, 24)).cumsum(axis=0)).astype(np.float32)
        data[rng.integers(2, 10):] += 0.5
        np.save(folder / f"vol{index:02d}.npy", data)
        paths.append(folder / f"vol{index:02d}.npy")
    (folder / "corrupt.npy").write_bytes(b"\x93NUMPY not really")
    (folder / "truncated.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(40))
    return sorted(folder.iterdir())


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / cli.RESULTS_NAME).read_text().splitlines()]


def _comparable(entries: list[dict]) -> dict[str, dict]:
    """The lines by source, without the timings (the only field that may differ between two runs)."""
    return {e["source"]: {k: v for k, v in e.items() if k != "timings_s"} for e in entries}


def _batch(paths, out: Path, tokens=None) -> list[dict]:
    status = cli.prune_batch(paths, out_dir=out, workers=1, as_json=True, tokens=tokens, **RUN)
    assert status == 1
    return _lines(out)


@pytest.fixture(scope="module")
def tiny_tokens():
    return cli.TokenOptions(bundle=cli.tiny_qwen3_vl(torch.device("cpu")), **TOKENS)


@pytest.fixture(scope="module")
def batch_model_lines(archive, tiny_tokens, tmp_path_factory) -> list[dict]:
    return _batch(archive, tmp_path_factory.mktemp("batch_model"), tiny_tokens)


def _assert_bad_files_named(entries: list[dict]) -> None:
    errors = {Path(e["source"]).name: e["error"] for e in entries if e["status"] == "error"}
    assert sorted(errors) == ["corrupt.npy", "truncated.nii.gz"]
    for name, message in errors.items():
        assert name in message


def test_iaf_job_equals_batch_rows_uses_both_nodes_and_resumes_a_batch_file(cluster, archive, tmp_path, capsys):
    reference = _batch(archive, tmp_path / "batch")
    assert len(reference) == GOOD + 2
    _assert_bad_files_named(reference)

    # Start from the batch mode's own file with five finished lines cut: the same resume key redoes
    # exactly those five (and the two bad files, which are tried again).
    out = tmp_path / "ray"
    out.mkdir()
    cut = {e["source"] for e in reference if e["status"] == "ok"}
    cut = set(sorted(cut)[:5])
    kept = [json.dumps(e) for e in reference if e["source"] not in cut and e["status"] == "ok"]
    (out / cli.RESULTS_NAME).write_text("\n".join(kept) + "\n")
    status, summary = prune_job(archive, out_dir=out, options=RayOptions(workers=2), **RUN)
    assert status == 1
    assert (summary["processed"], summary["already_done"], summary["failed"]) == (5, GOOD - 5, 2)
    assert summary["nodes"] == 2 and len(ray.nodes()) == 2
    lines = _lines(out)
    assert len(lines) == len(reference)
    assert _comparable(lines) == _comparable(reference)
    assert "5 volume(s) processed" in capsys.readouterr().out

    status, summary = prune_job(archive, out_dir=out, options=RayOptions(workers=2), **RUN)
    assert (summary["processed"], summary["already_done"], summary["failed"]) == (0, GOOD, 2)
    assert len(_lines(out)) == len(reference) + 2


def test_model_job_equals_the_single_process_batch(cluster, archive, batch_model_lines, tmp_path):
    out = tmp_path / "ray"
    status, summary = prune_job(
        archive, out_dir=out, options=RayOptions(workers=2, batch_size=2), model=ModelRef(),
        tokens=cli.TokenOptions(bundle=None, **TOKENS), **RUN,
    )
    assert status == 1 and (summary["processed"], summary["failed"]) == (GOOD, 2)
    lines = _lines(out)
    _assert_bad_files_named(lines)
    assert _comparable(lines) == _comparable(batch_model_lines)
    # The model ran: token counts per slice, zero on the slices IAF dropped.
    for entry in lines:
        if entry["status"] == "ok":
            per_slice = np.asarray(entry["tokens"]["tokens_per_slice"])
            assert per_slice.sum() == entry["tokens"]["tokens_after"] < entry["tokens"]["tokens_before"]
            assert np.flatnonzero(per_slice).tolist() == entry["kept_indices"]


class CrashOnce(ModelStage):
    """Kills its own worker process at one volume the first time it meets it."""

    marker: Path
    victim: str

    def run_one(self, source, path, stamp, payload):
        if source.endswith(self.victim) and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().run_one(source, path, stamp, payload)


def test_a_killed_actor_loses_no_finished_line(cluster, archive, batch_model_lines, tmp_path):
    CrashOnce.marker, CrashOnce.victim = tmp_path / "crashed", "vol11.npy"
    out = tmp_path / "ray"
    status, summary = prune_job(
        archive, out_dir=out, options=RayOptions(workers=1), model=ModelRef(),
        tokens=cli.TokenOptions(bundle=None, **TOKENS), model_stage=CrashOnce, **RUN,
    )
    assert CrashOnce.marker.exists()
    assert status == 1 and (summary["processed"], summary["failed"]) == (GOOD, 2)
    lines = _lines(out)
    # One line per volume: none lost with the actor, none written twice by its retried batch.
    assert sorted(e["source"] for e in lines) == sorted(str(p.resolve()) for p in archive)
    assert _comparable(lines) == _comparable(batch_model_lines)


def test_cli_engine_ray_reads_a_manifest(cluster, archive, tmp_path, capsys):
    manifest = tmp_path / "studies.txt"
    manifest.write_text("# archive\n" + "\n".join(str(p) for p in archive[2:6]) + "\n\n")
    out = tmp_path / "out"
    argv = ["prune", str(manifest), "--engine", "ray", "--address", cluster.address, "--workers", "2"]
    argv += ["--out", str(out), "--gamma", str(GAMMA), "--window", "percentile", "--backend", "torch"]
    assert cli.main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["engine"], summary["processed"], summary["failed"]) == ("ray", 4, 0)
    assert summary["volumes_per_second"] > 0
    assert sorted(e["source"] for e in _lines(out)) == sorted(str(p.resolve()) for p in archive[2:6])
    assert cli.main(argv) == 0
    assert "0 volume(s) processed, 4 already in" in capsys.readouterr().out


def test_iaf_job_writes_shards_and_resumes_them_with_the_batch_key(cluster, archive, tmp_path, capsys):
    reference = _batch(archive, tmp_path / "batch")
    out = tmp_path / "ray"
    argv = ["prune", str(archive[0].parent / "*"), "--engine", "ray", "--address", cluster.address, "--workers", "2",
            "--out", str(out), "--gamma", str(GAMMA), "--window", "percentile", "--backend", "torch", "--json"]
    assert cli.main([*argv, "--shard-rows", "7"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shards"] == [f"results-{k:05d}.jsonl" for k in range(3)]
    assert not (out / cli.RESULTS_NAME).exists()

    def shard_lines():
        return [[json.loads(line) for line in (out / name).read_text().splitlines()]
                for name in sorted(p.name for p in out.glob("results-*.jsonl"))]

    assert [len(lines) for lines in shard_lines()] == [7, 7, 6]
    assert _comparable([e for lines in shard_lines() for e in lines]) == _comparable(reference)

    # The resume reads every shard: only the two bad files are tried again, filling the last shard.
    # A source's last line across the shards is its current one: an error line appended for a volume
    # done in the first shard makes it redo.
    first = next(e for e in shard_lines()[0] if e["status"] == "ok")
    with open(out / "results-00002.jsonl", "a") as handle:
        handle.write(json.dumps({**first, "status": "error", "error": "edited"}) + "\n")
    assert cli.main([*argv, "--shard-rows", "7"]) == 1
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["processed"], summary["already_done"], summary["failed"]) == (1, GOOD - 1, 2)
    assert [len(lines) for lines in shard_lines()] == [7, 7, 7, 3]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--shard-rows", "x"])
    assert cli.main([*argv, "--shard-rows", "0"]) == 2
    assert "--shard-rows must be at least 1" in capsys.readouterr().err


def test_manifests_text_csv_and_glob(tmp_path, archive):
    (tmp_path / "rel.npy").write_bytes(b"")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("id,path\na," + str(archive[0]) + "\nb,rel.npy\n")
    assert read_manifest([str(csv_file)]) == [archive[0], tmp_path / "rel.npy"]
    headless = tmp_path / "plain.csv"
    headless.write_text(f"{archive[1]},x\n")
    assert read_manifest([str(headless)]) == [archive[1]]
    text = tmp_path / "list.txt"
    text.write_text(f"{archive[2]}\n# skipped\nrel.npy\n")
    assert read_manifest([str(text)]) == [archive[2], tmp_path / "rel.npy"]
    assert read_manifest([str(archive[0].parent / "vol0*.npy")]) == archive[2:12]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(cli.CommandError, match="no volumes"):
        read_manifest([str(tmp_path / "empty.txt")])


# ------------------------------------------------------------------------------------------ eval
EVAL_SETTINGS = EvalSettings(methods=("iaf", "random", "topk"), tau=0.5, backend="torch", max_new_tokens=1,
                             resolution=32, bootstrap=20)
EVAL_GOOD = 5


@pytest.fixture(scope="module")
def eval_dataset(tmp_path_factory):
    """A jsonl dataset of five closed questions on small volumes and one on a corrupt file."""
    folder = tmp_path_factory.mktemp("eval_data")
    rng = np.random.default_rng(3)
    lines = []
    for index in range(EVAL_GOOD + 1):
        name = f"v{index}.npy"
        if index == 2:
            (folder / name).write_bytes(b"\x93NUMPY broken")
        else:
            np.save(folder / name, rng.random((4, 16, 16), dtype=np.float32))
        lines.append({"volume": name, "question": f"Question {index}?", "answer": "yes",
                      "options": {"A": "yes", "B": "no"}, "answer_letter": "A", "category": f"c{index % 2}",
                      "id": f"s{index}"})
    (folder / "d.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_dataset(folder / "d.jsonl", "jsonl")


def _records(out: Path) -> dict[str, dict]:
    """The records of every records file by key, without the timings (the only fields that may differ
    between two runs)."""
    return {r["key"]: {k: v for k, v in r.items() if k not in ("seconds", "seconds_split")}
            for path in record_files(out) for r in read_records(path)}


def _untimed(methods: dict) -> dict:
    """A summary's methods without the measured seconds (the cost model's numbers stay)."""
    return {name: {**entry, "cost": {k: v for k, v in entry["cost"].items() if k != "seconds_median"}}
            for name, entry in methods.items()}


@pytest.fixture(scope="module")
def single_eval(eval_dataset, tmp_path_factory):
    """The single-process run: (its folder, its records by key without timings, its summary)."""
    out = tmp_path_factory.mktemp("single_eval")
    model = eval_model(None, torch.device("cpu"), EVAL_SETTINGS.resolution)
    summary = run_eval(eval_dataset, model, EVAL_SETTINGS, out, progress=False, html=False)
    return out, _records(out), summary


def test_eval_job_equals_the_single_process_run_and_resumes_it(cluster, eval_dataset, single_eval, tmp_path, capsys):
    single, expected, reference = single_eval
    assert len(expected) == EVAL_GOOD * 5 and len(reference["failed_samples"]) == 1
    assert "v2.npy" in reference["failed_samples"][0]["reason"]

    # Start from the single-process file without sample s0 and without s3's last two methods (a
    # half-done sample: its budget comes from the medpruner record already in the file).
    out = tmp_path / "ray"
    out.mkdir()
    lines = (single / RECORDS_NAME).read_text().splitlines()
    cut = [line for line in lines if json.loads(line)["sample_id"] != "s0"
           and not (json.loads(line)["sample_id"] == "s3" and json.loads(line)["method"] in ("random", "topk"))]
    assert len(cut) == len(lines) - 7
    (out / RECORDS_NAME).write_text("\n".join(cut) + "\n")
    summary = eval_job(eval_dataset, EvalModelRef(None, EVAL_SETTINGS.resolution, "cpu"), EVAL_SETTINGS, out,
                       options=RayOptions(workers=2), html=False)
    assert "2 sample(s) run, 3 already done, 1 failed, 7 record(s) written" in capsys.readouterr().err
    assert _records(out) == expected and len(read_records(out / RECORDS_NAME)) == len(lines)
    assert summary["failed_samples"] == reference["failed_samples"]
    assert _untimed(summary["methods"]) == _untimed(reference["methods"])
    assert summary["settings_id"] == reference["settings_id"]

    # A rerun (here through the command line) writes nothing and gives the same summary.
    before = (out / RECORDS_NAME).read_text()
    argv = ["eval", "--data", str(eval_dataset.file), "--format", "jsonl", "--out", str(out), "--methods",
            "iaf,random,topk", "--resolution", "32", "--tau", "0.5", "--max-new-tokens", "1", "--bootstrap", "20",
            "--backend", "torch", "--device", "cpu", "--no-progress", "--no-html", "--json",
            "--engine", "ray", "--address", cluster.address, "--workers", "2"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert _untimed(json.loads(captured.out)["methods"]) == _untimed(reference["methods"])
    assert "0 sample(s) run, 5 already done, 1 failed, 0 record(s) written" in captured.err
    assert (out / RECORDS_NAME).read_text() == before


def test_eval_job_writes_shards_that_both_engines_resume(cluster, eval_dataset, single_eval, tmp_path):
    single, expected, reference = single_eval
    # Samples s0 and s1 done by the single-process run in samples.jsonl; the job adds s3..s5 in shards
    # of 4 records (15 records: 4 + 4 + 4 + 3).
    out = tmp_path / "ray"
    out.mkdir()
    lines = (single / RECORDS_NAME).read_text().splitlines()
    head = [line for line in lines if json.loads(line)["sample_id"] in ("s0", "s1")]
    (out / RECORDS_NAME).write_text("\n".join(head) + "\n")
    summary = eval_job(eval_dataset, EvalModelRef(None, EVAL_SETTINGS.resolution, "cpu"), EVAL_SETTINGS, out,
                       options=RayOptions(workers=1), html=False, shard_rows=4)
    shards = shard_files(out, "samples")
    assert [p.name for p in shards] == [f"samples-{k:05d}.jsonl" for k in range(4)]
    assert [len(read_records(p)) for p in shards] == [4, 4, 4, 3]
    assert summary["files"]["record_shards"] == [p.name for p in shards]
    assert (out / RECORDS_NAME).read_text().splitlines() == head
    assert _records(out) == expected
    assert _untimed(summary["methods"]) == _untimed(reference["methods"])
    assert summary["failed_samples"] == reference["failed_samples"]

    # The single-process run reads the shards too: nothing left to do, the same summary.
    before = {p.name: p.read_text() for p in record_files(out)}
    model = eval_model(None, torch.device("cpu"), EVAL_SETTINGS.resolution)
    again = run_eval(eval_dataset, model, EVAL_SETTINGS, out, progress=False, html=False)
    assert {p.name: p.read_text() for p in record_files(out)} == before
    assert _untimed(again["methods"]) == _untimed(reference["methods"])


class EvalCrashOnce(EvalStage):
    """Kills its own worker process at one sample the first time it meets it."""

    marker: Path
    victim: str

    def run_one(self, index, sample, existing, volume):
        if sample.sample_id == self.victim and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().run_one(index, sample, existing, volume)


def test_eval_job_a_killed_actor_loses_no_record(cluster, eval_dataset, single_eval, tmp_path):
    _, expected, reference = single_eval
    EvalCrashOnce.marker, EvalCrashOnce.victim = tmp_path / "crashed", "s3"
    out = tmp_path / "ray"
    summary = eval_job(eval_dataset, EvalModelRef(None, EVAL_SETTINGS.resolution, "cpu"), EVAL_SETTINGS, out,
                       options=RayOptions(workers=1), html=False, stage=EvalCrashOnce)
    assert EvalCrashOnce.marker.exists()
    # One record per sample and method: none lost with the actor, none written twice by the retry.
    assert len(read_records(out / RECORDS_NAME)) == len(expected)
    assert _records(out) == expected and _untimed(summary["methods"]) == _untimed(reference["methods"])


def test_shard_writer_rotates_and_continues_the_last_shard(tmp_path):
    writer = ShardWriter(tmp_path, "samples", 2)
    assert [writer.write(f'{{"n": {n}}}').name for n in range(3)] == [
        "samples-00000.jsonl", "samples-00000.jsonl", "samples-00001.jsonl"]
    # A new writer (a resumed job) fills the last shard before starting another.
    writer = ShardWriter(tmp_path, "samples", 2)
    assert [writer.write(f'{{"n": {n}}}').name for n in range(3, 6)] == [
        "samples-00001.jsonl", "samples-00002.jsonl", "samples-00002.jsonl"]
    (tmp_path / "samples-x.jsonl").write_text("")
    (tmp_path / "other-00009.jsonl").write_text("")
    shards = shard_files(tmp_path, "samples")
    assert [p.name for p in shards] == [f"samples-{k:05d}.jsonl" for k in range(3)]
    assert [r["n"] for p in shards for r in read_records(p)] == list(range(6))
    for rows in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rows"):
            ShardWriter(tmp_path, "samples", rows)


@pytest.mark.parametrize(
    "options", [["--shard-rows", "4"], ["--address", "auto"], ["--batch-size", "2", "--gpus-per-actor", "1"]]
)
def test_ray_options_need_the_ray_engine(eval_dataset, tmp_path, capsys, options):
    commands = {
        "eval": ["eval", "--data", str(eval_dataset.file), "--format", "jsonl", "--out", str(tmp_path / "eval")],
        "prune": ["prune", str(eval_dataset.file), "--out", str(tmp_path / "prune")],
    }
    for argv in commands.values():
        assert cli.main([*argv, *options]) == 2
        error = capsys.readouterr().err
        assert "only with --engine ray" in error
        assert options[0] in error
