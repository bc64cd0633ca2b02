"""``medpruner demo``: a synthetic CT-like volume with lesions through the shipped synthetic-VQA checkpoint
(or, with ``--model``, the bundled MNI152 brain MRI through a local checkpoint), with a report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from medpruner.cli.common import CommandError, check_backend, check_output_dir, pick_device
from medpruner.cli.models import MODEL_RESOLUTION, TokenResult, load_model, tiny_vqa, token_options
from medpruner.cli.prune import prune_and_report, report_files, summary_text
from medpruner.report import atomic_write_text, render_html, to_json

MNI_TEMPLATE = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
NIBABEL_SAMPLE = ("nibabel", "tests/data/anatomical.nii")
DEMO_VOLUME_NAME = "synthetic-volume.npy"
# The synthetic volume is already in [0, 1]: no Hounsfield window, its values are used as they are.
IDENTITY_WINDOW = "unit"
# What the synthetic volume is: CT-like anatomy drawn directly in [0, 1], not Hounsfield units.
DEMO_MODALITY = "synthetic (CT-like, intensities in [0, 1])"


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


def lesion_focus(tokens: TokenResult, slice_keep, token_lesion: np.ndarray) -> dict:
    """Where the checkpoint's attention goes on the report's heatmap slices that hold a lesion:
    ``importance_share`` (DINS importance mass on lesion tokens / all of those slices' mass) against
    ``area_share`` (lesion tokens / tokens there), and the kept fraction of lesion and other tokens.
    ``tokens``: the model run (its heatmap slices' importance and keep mask); ``slice_keep``: IAF's
    mask; ``token_lesion``: bool ``[D, T]``, the tokens (row-major merged-token order) over a lesion voxel."""
    lesion_slices = [int(s) for s in np.flatnonzero(token_lesion.any(axis=1))]
    kept = np.asarray(slice_keep, dtype=bool)
    mass = [0.0, 0.0]
    counts = {"lesion": [0, 0], "background": [0, 0]}
    shown = []
    for index, scores, keep in zip(tokens.heatmap_slices, tokens.importance, tokens.keep, strict=True):
        on_lesion = token_lesion[index]
        if not on_lesion.any():
            continue
        shown.append(index)
        scores, keep = np.asarray(scores, dtype=np.float64), np.asarray(keep, dtype=bool)
        mass[0] += scores[on_lesion].sum()
        mass[1] += scores.sum()
        for name, where in (("lesion", on_lesion), ("background", ~on_lesion)):
            counts[name][0] += int(keep[where].sum())
            counts[name][1] += int(where.sum())
    lesion_tokens, all_tokens = counts["lesion"][1], counts["lesion"][1] + counts["background"][1]
    return {
        "lesion_slices": lesion_slices,
        "lesion_slices_kept_by_iaf": [s for s in lesion_slices if kept[s]],
        "heatmap_lesion_slices": shown,
        "importance_share": mass[0] / mass[1] if mass[1] > 0 else None,
        "area_share": lesion_tokens / all_tokens if all_tokens else None,
        "lesion_tokens_kept": counts["lesion"][0] / lesion_tokens if lesion_tokens else None,
        "background_tokens_kept": counts["background"][0] / counts["background"][1]
        if counts["background"][1] else None,
    }


def _synthetic_demo(args, out_dir: Path, device):
    """The synthetic volume written to ``out_dir``, the checkpoint, its presence question, and the
    lesion tokens at the checkpoint's grid."""
    from medpruner.checkpoints import TINY_VQA_RESOLUTION
    from medpruner.synthetic import demo_volume, questions_for

    volume = demo_volume()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / DEMO_VOLUME_NAME
    np.save(source, volume.data)
    bundle = tiny_vqa(device)
    resolution = args.resolution or TINY_VQA_RESOLUTION
    token_lesion = volume.token_mask(resolution // bundle.size_multiple)
    if args.prompt is None:
        args.prompt = next(s for s in questions_for(volume) if s.category == "presence").question
    return source, bundle, resolution, token_lesion, volume


def cmd_demo(args) -> int:
    from medpruner.cli.models import DEFAULT_PROMPT

    out_dir = check_output_dir(args.out)
    device = pick_device(args.device)
    check_backend(args.backend, device)
    token_lesion = None
    modality = None
    if args.model is None:
        source, bundle, resolution, token_lesion, volume = _synthetic_demo(args, out_dir, device)
        window, extra = IDENTITY_WINDOW, {"demo": True, "synthetic_volume": volume.volume_id}
        modality = DEMO_MODALITY
        heatmap_slices = tuple(int(s) for s in np.flatnonzero(token_lesion.any(axis=1)))
    else:
        source, bundle, resolution = demo_volume_path(), load_model(args.model, device), MODEL_RESOLUTION
        window, extra, heatmap_slices = "auto", {"demo": True}, ()
        args.prompt = args.prompt or DEFAULT_PROMPT
    tokens = token_options(args, bundle, resolution)
    tokens.heatmap_slices = heatmap_slices
    record, token_result = prune_and_report(
        source,
        gamma=args.gamma,
        window=window,
        slice_axis=None,
        frame=None,
        backend=args.backend,
        device=args.device,
        out_dir=out_dir,
        tokens=tokens,
        extra_config=extra,
        html_page=not args.no_html,
        modality=modality,
        marked=None if token_lesion is None else dict.fromkeys(heatmap_slices, "lesion"),
    )
    if token_lesion is not None:
        record["lesion_focus"] = dict(lesion_focus(token_result, record["result"]["keep"], token_lesion),
                                      lesions=[vars(lesion) for lesion in volume.lesions],
                                      heatmap_slices=list(token_result.heatmap_slices))
        saved = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
        saved["lesion_focus"] = record["lesion_focus"]
        if not args.no_html:
            images = {name: (out_dir / name).read_bytes() for name in saved["files"] if name.endswith(".png")}
            atomic_write_text(out_dir / "report.html", render_html(saved, images))
        atomic_write_text(out_dir / "report.json", to_json(saved) + "\n")
    if args.json:
        print(to_json(record))
    else:
        print(summary_text(record))
        focus = record.get("lesion_focus")
        if focus and focus["importance_share"] is not None:
            print(f"lesions    {focus['importance_share']:.0%} of the attention on {focus['area_share']:.0%} of the "
                  f"tokens (heatmap slices {focus['heatmap_lesion_slices']}); lesion slices kept by IAF "
                  f"{len(focus['lesion_slices_kept_by_iaf'])}/{len(focus['lesion_slices'])}")
        print(f"report     {report_files(out_dir)}")
    return 0
