"""Volumes per second of ``prune --engine ray`` with the tiny Qwen3-VL at 1 and 2 model actors, in one
run on one local Ray cluster, and their ratio. Writes bench/results/ray-<machine>-<date>.json.

    python bench/bench_ray.py [--volumes 16] [--resolution 64] [--max-new-tokens 4]

The time of each job includes starting its actors (each loads the model), as a real job's does."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np


def _volumes(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        data = (rng.random((48, 48)) + rng.normal(0, 0.01, size=(16, 48, 48)).cumsum(axis=0)).astype(np.float32)
        data[8:] += 0.5
        paths.append(folder / f"vol{index:03d}.npy")
        np.save(paths[-1], data)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/ray-<machine>-<date>.json)")
    args = parser.parse_args()

    import ray
    from medpruner.cli.models import TokenOptions
    from medpruner.distributed import ModelRef, RayOptions, prune_job

    tokens = TokenOptions(bundle=None, tau=0.9, mode="fast", merge=True, prompt="Describe.",
                          resolution=args.resolution, max_new_tokens=args.max_new_tokens)
    cpus = os.cpu_count() or 1
    # Two actors and a reader: three logical CPUs (see medpruner.distributed.connect).
    ray.init(num_cpus=max(3, cpus), include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        paths = _volumes(Path(scratch), args.volumes)
        for workers in (1, 2):
            _, summary = prune_job(
                paths, out_dir=Path(scratch) / f"out{workers}", gamma=0.05, window="percentile", slice_axis=None,
                frame=None, backend="auto", device="cpu", options=RayOptions(workers=workers), model=ModelRef(),
                tokens=tokens, as_json=True,
            )
            rows.append({"workers": workers, "seconds": summary["seconds"],
                         "volumes_per_second": summary["volumes_per_second"], "processed": summary["processed"]})
    ray.shutdown()
    result = {
        "benchmark": "prune --engine ray, tiny Qwen3-VL (random weights), local cluster",
        "machine": {"cpus": cpus, "platform": platform.platform()},
        "volumes": args.volumes, "volume_shape": [16, 48, 48], "resolution": args.resolution,
        "max_new_tokens": args.max_new_tokens,
        "runs": rows,
        "ratio_2_over_1": round(rows[1]["volumes_per_second"] / rows[0]["volumes_per_second"], 3),
    }
    today = datetime.date.today().isoformat()
    out = Path(args.out or Path(__file__).parent / "results" / f"ray-{cpus}core-{today}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
