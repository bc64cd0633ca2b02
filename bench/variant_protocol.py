"""The slice-stage variants' protocol (issue 27): tune ``gamma_local`` on the synthetic validation split
only, then report the test split once, every method at the same budgets, with the per-class audit.

    python bench/variant_protocol.py --out bench/results/variant-protocol-<date>

For each MedPruner setting (gamma, tau: one budget level, since every budgeted method gets, per
sample, the tokens the adaptive MedPruner kept), each candidate ``gamma_local`` (a multiple of gamma: the
largest block change of a slice is at least its mean change) is run on the validation volumes with the three
variants (``medpruner_local``, ``medpruner_change``, ``medpruner_local_change``); the chosen value is the
one whose best variant is most accurate there (ties: the larger value, which keeps fewer slices). Then
the test split runs once per gamma with every method and the chosen ``gamma_local``. ``protocol.json``
records the validation scores, the choices and the test summaries' paths; ``bench/eval_table.py`` draws
the tables and the cost plot from the test summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

VARIANTS = ("medpruner_local", "medpruner_change", "medpruner_local_change")
LEVELS = ("0.05:0.9", "0.05:0.5", "0.1:0.9")
GAMMA_LOCAL_MULTIPLES = (1.0, 1.5, 2.0, 3.0)


def _accuracy(summary: dict, method: str) -> float:
    return summary["methods"][method]["metrics"]["overall"]["accuracy"]["mean"]


def _run(out: Path, split: str, volumes: int, gamma: float, tau: float, gamma_local: float, methods: str) -> dict:
    from medpruner.cli import main

    args = ["eval", "--out", str(out), "--split", split, "--synthetic-volumes", str(volumes), "--gamma", str(gamma),
            "--tau", str(tau), "--gamma-local", str(gamma_local), "--methods", methods, "--no-progress", "--no-html"]
    status = main(args)
    if status != 0:
        raise SystemExit(f"medpruner {' '.join(args)} exited {status}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--val-volumes", type=int, default=60)
    parser.add_argument("--test-volumes", type=int, default=200)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), help="MedPruner settings, gamma:tau")
    parser.add_argument("--multiples", type=float, nargs="+", default=list(GAMMA_LOCAL_MULTIPLES),
                        help="gamma_local candidates, as multiples of gamma")
    args = parser.parse_args(argv)
    record = {"date": time.strftime("%Y-%m-%d"), "val_volumes": args.val_volumes, "test_volumes": args.test_volumes,
              "multiples": args.multiples, "levels": []}
    for text in args.levels:
        gamma, tau = (float(part) for part in text.split(":"))
        level = {"gamma": gamma, "tau": tau, "validation": []}
        for multiple in args.multiples:
            gamma_local = round(gamma * multiple, 6)
            summary = _run(args.out / f"val-g{gamma}-t{tau}-l{gamma_local}", "val", args.val_volumes, gamma, tau,
                           gamma_local, ",".join(VARIANTS))
            scores = {m: _accuracy(summary, m) for m in ("medpruner", *VARIANTS)}
            level["validation"].append({"gamma_local": gamma_local, "accuracy": scores})
            print(f"val gamma {gamma} tau {tau} gamma_local {gamma_local}: {scores}", flush=True)
        best = max(level["validation"], key=lambda v: (max(v["accuracy"][m] for m in VARIANTS), v["gamma_local"]))
        level["chosen_gamma_local"] = best["gamma_local"]
        test_out = args.out / f"test-g{gamma}-t{tau}"
        _run(test_out, "test", args.test_volumes, gamma, tau, best["gamma_local"], "all")
        level["test_summary"] = str((test_out / "summary.json").relative_to(args.out))
        record["levels"].append(level)
        (args.out / "protocol.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
