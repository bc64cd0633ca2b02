"""``medpruner prune|eval --engine ray``: the command line's side of :mod:`medpruner.distributed`."""

from __future__ import annotations

from pathlib import Path

from medpruner.cli.common import CommandError
from medpruner.cli.models import MODEL_RESOLUTION, check_model_path, token_options


def add_engine_options(parser, *, vllm_help: str | None = None) -> None:
    """``--engine`` and the Ray job's options (the local engine refuses them: see
    :func:`reject_ray_options`); with ``vllm_help`` (eval only) the ``vllm`` engine is a choice too."""
    choices, text = ("local", "ray"), "local: this process (default); ray: a Ray Data job (pip install 'ray[data]')"
    if vllm_help is not None:
        choices, text = (*choices, "vllm"), f"{text}; vllm: {vllm_help}"
    parser.add_argument("--engine", choices=choices, default="local", help=text)
    parser.add_argument(
        "--address", default=None,
        help="Ray cluster to join (auto, HOST:6379 or ray://HOST:10001); default: a local one on this machine",
    )
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="Ray: GPUs per model actor (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="Ray: volumes per model call (default 1)")
    parser.add_argument(
        "--shard-rows", type=int, default=None,
        help="Ray: lines per shard OUT/results-<k>.jsonl (eval: samples-<k>.jsonl); default: one file",
    )


def reject_ray_options(args) -> None:
    """The local engine has no use for the Ray job's options: one given with it is a usage error, not
    silently ignored."""
    given = [
        flag
        for flag, value, default in (
            ("--address", args.address, None),
            ("--gpus-per-actor", args.gpus_per_actor, 0.0),
            ("--batch-size", args.batch_size, 1),
            ("--shard-rows", args.shard_rows, None),
        )
        if value != default
    ]
    if given:
        raise CommandError(f"{', '.join(given)}: only with --engine ray")


def _check_ray(args) -> None:
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise CommandError("--engine ray needs Ray Data: pip install 'ray[data]'") from err
    if args.batch_size < 1 or args.gpus_per_actor < 0:
        raise CommandError("--batch-size must be at least 1 and --gpus-per-actor at least 0")
    if args.shard_rows is not None and args.shard_rows < 1:
        raise CommandError("--shard-rows must be at least 1")


def _options(args):
    from medpruner.distributed import RayOptions

    return RayOptions(
        address=args.address, workers=args.workers, gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size
    )


def prune_ray(args) -> int:
    """A batch ``prune`` as a Ray Data job; ``--workers`` is the number of model actors (or, without a
    model, of CPU tasks in flight)."""
    _check_ray(args)
    from medpruner.distributed import ModelRef, prune_job, read_manifest

    if args.out is None:
        raise CommandError("--engine ray needs --out DIR (results.jsonl is written there)")
    paths = read_manifest(args.volumes)
    model = tokens = None
    if args.model is not None:
        check_model_path(args.model)
        model = ModelRef(args.model)
        tokens = token_options(args, None, MODEL_RESOLUTION)
    status, _ = prune_job(
        paths, out_dir=Path(args.out), gamma=args.gamma, window=args.window, slice_axis=args.slice_axis,
        frame=args.frame, backend=args.backend, device=args.device, options=_options(args), model=model,
        tokens=tokens, as_json=args.json, shard_rows=args.shard_rows,
    )
    return status


def eval_ray(args, dataset, settings, resolution: int) -> dict:
    """``medpruner eval`` as a Ray Data job; ``--workers`` is the number of model actors, each loading
    ``--model`` (or the default model) itself."""
    _check_ray(args)
    from medpruner.distributed import EvalModelRef, eval_job

    check_model_path(args.model)
    model = EvalModelRef(args.model, resolution, args.device)
    return eval_job(dataset, model, settings, Path(args.out), options=_options(args), html=not args.no_html,
                    shard_rows=args.shard_rows)
