"""The argument parser, ``medpruner prune``'s choice between one volume and a batch, and ``main``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from medpruner.cli.batch import expand_inputs, prune_batch
from medpruner.cli.bench import cmd_bench
from medpruner.cli.common import (
    CommandError,
    Interrupted,
    check_backend,
    check_output_dir,
    gamma_option,
    pick_device,
    tau_option,
)
from medpruner.cli.demo import cmd_demo
from medpruner.cli.eval import add_parser as add_eval_parser
from medpruner.cli.models import DEFAULT_PROMPT, MODEL_RESOLUTION, SHIPPED_MODELS, load_model, token_options
from medpruner.cli.prune import prune_one, report_files, summary_text
from medpruner.cli.ray_engine import add_engine_options, prune_ray, reject_ray_options
from medpruner.report import to_json
from medpruner.volume import CT_WINDOWS, VolumeError, resolve_window

DEFAULT_GAMMA = 0.05

# Options that only a model run uses (None/False when not given).
_TOKEN_ONLY = ("tau", "mode", "no_merge", "resolution")


def cmd_prune(args) -> int:
    if args.out is not None:
        check_output_dir(args.out)
    if args.engine == "ray":
        if args.key is not None:
            raise CommandError("--key: not supported with --engine ray (save the array alone in a .npy)")
        return prune_ray(args)
    reject_ray_options(args)
    paths, batch = expand_inputs(args.volumes)
    if batch:
        if args.out is None:
            raise CommandError("several volumes need --out DIR (results.jsonl is written there)")
        if not paths:
            raise CommandError(f"no volumes found in {' '.join(args.volumes)}")
    elif args.retry_failed:
        raise CommandError("--retry-failed: only a batch (several volumes) keeps failures to retry")
    if args.model is None:
        token_only = [
            f"--{name.replace('_', '-')}" for name in _TOKEN_ONLY if getattr(args, name) not in (None, False)
        ]
        if token_only:
            raise CommandError(f"{', '.join(token_only)}: token-level options need --model")
    check_backend(args.backend, pick_device(args.device))
    tokens = None
    if args.model is not None:
        tokens = token_options(args, load_model(args.model, pick_device(args.device)), MODEL_RESOLUTION)
    common = dict(
        gamma=args.gamma,
        window=args.window,
        slice_axis=args.slice_axis,
        frame=args.frame,
        key=args.key,
        backend=args.backend,
        device=args.device,
        tokens=tokens,
    )
    if batch:
        return prune_batch(
            paths, out_dir=Path(args.out), workers=args.workers, as_json=args.json,
            retry_failed=args.retry_failed, **common,
        )
    out_dir = None if args.out is None else Path(args.out)
    record = prune_one(paths[0], out_dir=out_dir, html_page=not args.no_html, **common)
    print(to_json(record) if args.json else summary_text(record))
    if out_dir is not None and not args.json:
        print(f"report     {report_files(out_dir)}")
    return 0


# ------------------------------------------------------------------------------------------ parser
def _window(text: str) -> str:
    try:
        resolve_window(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def _backend(text: str) -> str:
    # The kernels' own list; imported here, when the option is given, so that `medpruner --help` and
    # `medpruner bench` start without importing torch.
    from medpruner_kernels._dispatch import BACKENDS

    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"backend must be one of {', '.join(BACKENDS)}, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gamma",
        type=gamma_option,
        default=DEFAULT_GAMMA,
        help="IAF threshold in [0, 2]: mean |slice difference| on the models' [-1, 1] scale (default 0.05, "
        "as in the paper)",
    )
    parser.add_argument(
        "--backend",
        type=_backend,
        default="auto",
        help="kernel backend: auto (default: the fastest that runs on the device), triton, cpp or torch",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--json", action="store_true", help="print machine-readable JSON instead of a summary"
    )


def _add_model_options(parser: argparse.ArgumentParser, model_help: str) -> None:
    parser.add_argument("--model", default=None, help=f"{model_help}; {' or '.join(SHIPPED_MODELS)}: the "
                        "shipped synthetic-VQA checkpoint (offline)")
    parser.add_argument(
        "--tau", type=tau_option, default=None,
        help="DINS nucleus mass kept per slice, > 0; 1 or more keeps every token (default 0.9)"
    )
    parser.add_argument(
        "--mode",
        choices=("fast", "paper"),
        default=None,
        help="fast: IAF before the vision tower (dropped slices are never encoded); paper: the paper's code",
    )
    parser.add_argument("--no-merge", action="store_true", help="drop pruned tokens instead of merging them")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="question asked about the volume")
    parser.add_argument(
        "--resolution",
        type=_positive_int,
        default=None,
        help=f"longer slice side fed to the model (default {MODEL_RESOLUTION}; the demo's checkpoint 64)",
    )
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=8, help="tokens to generate (default 8)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medpruner", description="Training-free visual-token pruning for 3D medical volumes (MedPruner)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    prune = commands.add_parser(
        "prune",
        help="drop near-duplicate slices (IAF) of one volume or many",
        description="One volume: prints a summary (or --json) and writes a report with --out. Several "
        "volumes (a folder of volumes, a glob or several paths): needs --out, keeps one JSON line per "
        "volume in OUT/results.jsonl, resumes where it stopped (a volume recorded under other settings, "
        "or edited since, is done again; one that failed is tried again only when its file changed or "
        "with --retry-failed), and goes on past bad files.",
    )
    prune.add_argument(
        "volumes",
        nargs="+",
        metavar="VOLUME",
        help="NIfTI/MGH/NRRD/.npy/.npz/DICOM file, DICOM series folder, folder of volumes, or glob",
    )
    _add_run_options(prune)
    prune.add_argument(
        "--window",
        type=_window,
        default="auto",
        help=f"CT window: {'|'.join(CT_WINDOWS)}, LEVEL,WIDTH in HU (a negative level as "
        "--window=-600,1500), 'percentile' (MRI), 'unit' (values already in [0, 1]), or "
        "auto (default: the DICOM's window or abdomen for CT, "
        "percentiles otherwise)",
    )
    prune.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None, help="axis to slice along")
    prune.add_argument("--frame", type=int, default=None, help="frame of a 4D image")
    prune.add_argument("--key", default=None, help="array of an .npz holding several (default: the only one, "
                       "else volume, image or data)")
    prune.add_argument("--retry-failed", action="store_true",
                       help="batch: try again the volumes that failed before, even when unchanged")
    prune.add_argument("--out", default=None, help="report folder (one volume) or results folder (batch)")
    prune.add_argument("--no-html", action="store_true", help="skip the self-contained report.html")
    prune.add_argument(
        "--workers", type=_positive_int, default=min(4, os.cpu_count() or 1),
        help="batch readers (--engine ray: model actors, or CPU tasks in flight without a model)",
    )
    add_engine_options(prune)
    _add_model_options(
        prune, "local VLM checkpoint folder: adds token-level pruning (DINS) inside its generate"
    )
    prune.set_defaults(handler=cmd_prune)

    demo = commands.add_parser(
        "demo", help="run the whole pipeline on a synthetic volume with lesions through the shipped checkpoint "
        "(or the MNI152 brain MRI through --model), write a report"
    )
    _add_run_options(demo)
    demo.add_argument("--out", default="medpruner-demo", help="report folder (default ./medpruner-demo)")
    demo.add_argument("--no-html", action="store_true", help="skip the self-contained report.html")
    _add_model_options(demo, "local VLM checkpoint folder, run on the MNI152 template (default: the shipped "
                             "synthetic-VQA checkpoint on a synthetic volume with lesions)")
    # None: the checkpoint's presence question (default model) or the generic prompt (--model).
    demo.set_defaults(handler=cmd_demo, prompt=None)

    bench = commands.add_parser("bench", help="run the bench/ microbenchmarks (pytest-benchmark)")
    bench.add_argument(
        "--bench-dir", default=None, help="benchmark folder (default ./bench or the checkout's)"
    )
    bench.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    bench.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments for pytest")
    bench.set_defaults(handler=cmd_bench)
    add_eval_parser(commands, _add_run_options, _positive_int)
    return parser


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("medpruner-kernels")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # pytest options for ``bench`` start with "-", which argparse would take for its own.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if args.command != "bench":
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.pytest_args = [*unknown, *args.pytest_args]
    try:
        return args.handler(args)
    except CommandError as err:
        print(f"medpruner: error: {err}", file=sys.stderr)
        return 2
    except VolumeError as err:
        print(f"medpruner: error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"medpruner: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.command in ("prune", "demo"):
            # A batch reports what it saved through Interrupted; one volume's report is written whole or not.
            print(f"medpruner: interrupted: nothing of this {args.command} was saved (a report is written "
                  "only when complete); rerun the same command", file=sys.stderr)
        else:
            print(f"medpruner: {args.command} interrupted", file=sys.stderr)
        return 130
