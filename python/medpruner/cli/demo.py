"""``medpruner demo``: the bundled MNI152 brain MRI through a (tiny) Qwen3-VL, with a report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from medpruner.cli.common import CommandError, pick_device
from medpruner.cli.models import DEMO_RESOLUTION, MODEL_RESOLUTION, load_model, tiny_qwen3_vl, token_options
from medpruner.cli.prune import prune_one, report_files, summary_text
from medpruner.report import to_json

MNI_TEMPLATE = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
NIBABEL_SAMPLE = ("nibabel", "tests/data/anatomical.nii")


def _package_file(package: str, relative: str) -> Path | None:
    # find_spec locates a top-level package without importing it (nilearn's import pulls sklearn).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relative
        if candidate.is_file():
            return candidate
    return None


def demo_volume_path() -> Path:
    """The MNI152 T1 template that ships with nilearn, else nibabel's small anatomical test image."""
    for package, relative in (MNI_TEMPLATE, NIBABEL_SAMPLE):
        found = _package_file(package, relative)
        if found is not None:
            return found
    raise CommandError(
        "demo: no bundled volume found; install nilearn (MNI152 template) or nibabel (its test data), "
        "or run `medpruner prune YOUR_VOLUME`"
    )


def cmd_demo(args) -> int:
    source = demo_volume_path()
    out_dir = Path(args.out)
    device = pick_device(args.device)
    if args.model is None:
        bundle = tiny_qwen3_vl(device)
    else:
        bundle = load_model(args.model, device)
    record = prune_one(
        source,
        gamma=args.gamma,
        window="auto",
        slice_axis=None,
        frame=None,
        backend=args.backend,
        device=args.device,
        out_dir=out_dir,
        tokens=token_options(args, bundle, DEMO_RESOLUTION if args.model is None else MODEL_RESOLUTION),
        extra_config={"demo": True},
        html_page=not args.no_html,
    )
    if args.json:
        print(to_json(record))
    else:
        print(summary_text(record))
        print(f"report     {report_files(out_dir)}")
    return 0
