"""The ``medpruner`` command.

    medpruner prune VOLUME [--gamma 0.05] [--window auto] [--out DIR] [--json]     one volume (+ report)
    medpruner prune VOLUME --model CKPT [--tau 0.9] [--mode fast|paper]           + token pruning (DINS)
    medpruner prune DIR_OR_GLOB ... --out DIR                                       many: results.jsonl
    medpruner demo [--out DIR] [--model CKPT]      synthetic lesions through the shipped checkpoint
    medpruner eval [--data DIR --format F] --out DIR          accuracy against retention, every method
    medpruner bench [--json] [PYTEST_ARGS ...]                 the bench/ microbenchmarks, as a table

Without a model, ``prune`` runs slice-level IAF: the volume is windowed to [0, 1] (CT presets or MRI
percentiles), mapped to the models' [-1, 1] scale, and compared with ``gamma`` on that scale
(DESIGN.md). With ``--model`` (a local checkpoint; the demo uses the shipped synthetic-VQA checkpoint
when none is given) the slices are resized to the model's resolution and the whole pipeline runs inside its
``generate``; the report's IAF then runs on the model's own pixel tensor, so its slice decisions are
the model's.

Layout: :mod:`.args` (parser, ``prune``'s one-or-many choice, ``main``), :mod:`.prune` (one volume),
:mod:`.batch` (many volumes), :mod:`.models` (a VLM inside the run), :mod:`.demo`, :mod:`.eval`, :mod:`.bench`,
:mod:`.common` (shared errors and device choice). The names below stay importable from
``medpruner.cli`` as before the split.
"""

from __future__ import annotations

from medpruner.cli.args import DEFAULT_GAMMA, build_parser, cmd_prune, main
from medpruner.cli.batch import RESULTS_NAME, expand_inputs, prune_batch
from medpruner.cli.bench import bench_rows, bench_table, cmd_bench
from medpruner.cli.common import CommandError
from medpruner.cli.demo import MNI_TEMPLATE, NIBABEL_SAMPLE, cmd_demo, demo_volume_path
from medpruner.cli.models import (
    DEFAULT_PROMPT,
    DEFAULT_TAU,
    MODEL_RESOLUTION,
    ModelBundle,
    TokenOptions,
    TokenResult,
    load_model,
    model_inputs,
    model_slices,
    run_model,
    tiny_qwen3_vl,
)
from medpruner.cli.prune import (
    PruneResult,
    prune_loaded,
    prune_one,
    result_record,
    run_iaf,
    summary_text,
    window_volume,
)

__all__ = [
    "CommandError",
    "DEFAULT_GAMMA",
    "DEFAULT_PROMPT",
    "DEFAULT_TAU",
    "MNI_TEMPLATE",
    "MODEL_RESOLUTION",
    "ModelBundle",
    "NIBABEL_SAMPLE",
    "PruneResult",
    "RESULTS_NAME",
    "TokenOptions",
    "TokenResult",
    "bench_rows",
    "bench_table",
    "build_parser",
    "cmd_bench",
    "cmd_demo",
    "cmd_prune",
    "demo_volume_path",
    "expand_inputs",
    "load_model",
    "main",
    "model_inputs",
    "model_slices",
    "prune_batch",
    "prune_loaded",
    "prune_one",
    "result_record",
    "run_iaf",
    "run_model",
    "summary_text",
    "tiny_qwen3_vl",
    "window_volume",
]
