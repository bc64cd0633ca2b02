"""Many volumes: which paths a command line names, and the resumable run that appends one line per
volume to ``results.jsonl`` and goes on past bad files."""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medpruner.cli.common import CommandError, Interrupted
from medpruner.cli.models import TokenOptions
from medpruner.cli.prune import prune_loaded, window_volume
from medpruner.report import atomic_write_text, to_json
from medpruner.volume import (
    NIBABEL_SUFFIXES,
    NRRD_SUFFIXES,
    NUMPY_SUFFIXES,
    SUPPORTED_SUFFIXES,
    VolumeError,
    load_volume,
)

RESULTS_NAME = "results.jsonl"
# Files that are whole volumes on their own; any other file in a folder makes it a DICOM series folder.
_VOLUME_FILE_SUFFIXES = NIBABEL_SUFFIXES + NRRD_SUFFIXES + NUMPY_SUFFIXES


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _is_series_folder(folder: Path) -> bool:
    """A folder of DICOM slices, not a folder of volumes: files only, none with a volume suffix."""
    entries = [e for e in folder.iterdir() if not e.name.startswith(".")]
    if any(e.is_dir() for e in entries):
        return False
    files = [e for e in entries if e.is_file()]
    return bool(files) and not any(e.name.lower().endswith(_VOLUME_FILE_SUFFIXES) for e in files)


def _folder_volumes(folder: Path) -> list[Path]:
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or entry.name == RESULTS_NAME:
            continue
        if entry.is_dir() or entry.name.lower().endswith(SUPPORTED_SUFFIXES):
            found.append(entry)
    return found


def expand_inputs(inputs: list[str]) -> tuple[list[Path], bool]:
    """Paths of the volumes named by ``inputs`` and whether this is a batch (several volumes, a glob,
    or a folder of volumes)."""
    volumes: list[Path] = []
    batch = len(inputs) > 1
    for text in inputs:
        path = Path(text)
        if _has_glob(text) and not path.exists():
            batch = True
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise CommandError(f"{text}: the pattern matches nothing")
            volumes.extend(Path(m) for m in matches)
        elif path.is_dir() and not _is_series_folder(path):
            batch = True
            volumes.extend(_folder_volumes(path))
        else:
            volumes.append(path)
    return volumes, batch


def _batch_settings(gamma: float, window, slice_axis, frame, tokens: TokenOptions | None, key=None) -> dict:
    """Everything a results line depends on besides its file, in its JSON form: a line recorded under
    other settings is not reused."""
    settings = {"gamma": gamma, "window": window, "slice_axis": slice_axis, "frame": frame}
    if key is not None:
        settings["key"] = key
    if tokens is not None:
        settings["tokens"] = {
            "model": tokens.bundle.name,
            **{k: getattr(tokens, k) for k in ("tau", "mode", "merge", "prompt", "resolution", "max_new_tokens")},
        }
    return json.loads(to_json(settings, indent=None))


def _source_stamp(path: Path) -> list[int] | None:
    """Size and newest modification time of a file, or of the files of a series folder: a source
    edited since its line was written is done again."""
    try:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        stats = [f.stat() for f in files]
    except OSError:
        return None
    return [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def _current_entries(files: list[Path]) -> dict[str, dict]:
    """The current line of each source in the results ``files`` (in reading order; missing ones are
    skipped): a source's last line across the files. A last line cut off by a crash is removed
    (atomically) first."""
    current = {}
    for path in files:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            atomic_write_text(path, text)
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "source" in entry:
                current[entry["source"]] = entry
    return current


def _resume_state(files: list[Path], settings: dict) -> dict[str, list[int]]:
    """Sources already done under ``settings`` according to the results ``files`` (see
    :func:`_current_entries`), with the stamp of the file they were done from."""
    return {
        source: entry.get("source_stamp")
        for source, entry in _current_entries(files).items()
        if entry.get("status") == "ok" and entry.get("settings") == settings
    }


def _failed_state(current: dict[str, dict], settings: dict) -> dict[str, list[int]]:
    """Sources whose current line is an error recorded under ``settings`` from a file with a known
    stamp: not tried again while the file is unchanged (unless ``--retry-failed``)."""
    return {
        source: entry["source_stamp"]
        for source, entry in current.items()
        if entry.get("status") == "error" and entry.get("settings") == settings and entry.get("source_stamp")
    }


def compact_results(results: Path) -> int:
    """Rewrite ``results`` with exactly one line per source, its current (last) one, in the order the
    sources first appear; atomically (a temporary file and ``os.replace``). Returns the line count."""
    current = _current_entries([results])
    if results.exists():
        atomic_write_text(results, "".join(to_json(e, indent=None) + "\n" for e in current.values()))
    return len(current)


def _append_line(results: Path, entry: dict) -> None:
    append_line(results, to_json(entry, indent=None))


def append_line(path: Path, line: str) -> None:
    """Append ``line`` (no newline) to ``path`` as one fsynced write on an O_APPEND descriptor: a crash
    leaves at most a cut-off last line, which the readers remove."""
    data = (line + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="volume", file=sys.stderr)


# What a volume's failure may raise in the Ray job: the volume is recorded as an error line and the job
# goes on. The batch mode records any exception of a volume (MemoryError included) as its error line.
ROW_ERRORS = (VolumeError, ValueError, TypeError, RuntimeError, OSError)


def batch_entry(source: str, stamp, settings: dict, gamma: float, record: dict, result) -> dict:
    """The results line of a volume done: ``record`` and ``result`` from :func:`prune_loaded`."""
    entry = {
        "source": source,
        "source_stamp": stamp,
        "settings": settings,
        "status": "ok",
        **{k: record["result"][k] for k in ("num_slices", "kept", "retention", "kept_indices")},
        "distance_to_anchor": record["result"]["distance_to_anchor"],
        "shape": record["volume"]["shape"],
        "spacing_mm": record["volume"]["spacing_mm"],
        "modality": record["volume"]["modality"],
        "assumed": record["volume"]["assumed"],
        "nonfinite": record["volume"]["nonfinite"],
        "constant": record["volume"]["constant"],
        "slice_axis": record["volume"]["slice_axis"],
        "gamma": gamma,
        "window": record["config"]["window"],
        "backend": result.backend,
        "device": result.device,
        "timings_s": record["timings_s"],
    }
    if "tokens" in record:
        entry["tokens"] = record["tokens"]
    return entry


def error_entry(path: Path, source: str, err: Exception, stamp=None, settings: dict | None = None) -> dict:
    """The results line of a volume that failed, naming the file and the reason; with the file's
    ``stamp`` and the run's ``settings`` a rerun leaves it alone until the file changes."""
    if isinstance(err, VolumeError):
        message = str(err)
    elif isinstance(err, MemoryError):
        message = f"{path}: out of memory while reading or pruning it (MemoryError)"
    else:
        message = f"{path}: {type(err).__name__}: {err}"
    entry = {"source": source, "status": "error", "error": message}
    if stamp is not None:
        entry["source_stamp"] = stamp
    if settings is not None:
        entry["settings"] = settings
    return entry


def _read_and_window(path: Path, window, slice_axis, frame, key=None):
    start = time.perf_counter()
    volume = load_volume(path, slice_axis=slice_axis, frame=frame, key=key)
    load_seconds = time.perf_counter() - start
    slices, chosen, window_seconds = window_volume(volume, window)
    return volume, slices, chosen, {"load": load_seconds, "window": window_seconds}


def prune_batch(
    paths: list[Path],
    *,
    out_dir: Path,
    gamma: float,
    window,
    slice_axis,
    frame,
    backend: str,
    device: str,
    workers: int,
    as_json: bool,
    tokens: TokenOptions | None = None,
    key: str | None = None,
    retry_failed: bool = False,
) -> int:
    """Read and window on a thread pool (file decoding and numpy release the GIL), run IAF in this
    thread, append one JSON line per volume to ``results.jsonl`` as it is done (a crash loses at most
    that volume), and at the end (or on Ctrl-C) rewrite the file with exactly one current line per
    source. Volumes already recorded as ``ok`` under the same settings, from a file unchanged since,
    are skipped; so are volumes that failed under the same settings from a file unchanged since,
    unless ``retry_failed``. Any exception of one volume is recorded as its error line and the run
    goes on (status 1 when a volume of this run has a current error line)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS_NAME
    settings = _batch_settings(gamma, window, slice_axis, frame, tokens, key)
    current = _current_entries([results])
    done = _resume_state([results], settings)
    failed_before = {} if retry_failed else _failed_state(current, settings)
    # Stamped before any read: an edit during the run makes the next run redo the volume.
    stamps = {path: _source_stamp(path) for path in paths}

    def unchanged(state: dict, path: Path) -> bool:
        return stamps[path] is not None and state.get(str(path.resolve()), "not done") == stamps[path]

    not_retried = [p for p in paths if not unchanged(done, p) and unchanged(failed_before, p)]
    pending = [p for p in paths if not unchanged(done, p) and not unchanged(failed_before, p)]
    skipped = len(paths) - len(pending) - len(not_retried)
    failures: list[tuple[str, str]] = []
    processed = 0
    bar = _progress(len(pending))
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        # A bounded window of reads in flight keeps memory at a few volumes, whatever the batch size.
        ahead = max(2, 2 * workers)
        read = (window, slice_axis, frame, key)
        futures = [pool.submit(_read_and_window, p, *read) for p in pending[:ahead]]
        for position, path in enumerate(pending):
            if position + ahead < len(pending):
                futures.append(pool.submit(_read_and_window, pending[position + ahead], *read))
            source = str(path.resolve())
            try:
                volume, slices, chosen, timings = futures[position].result()
                futures[position] = None
                record, result, _ = prune_loaded(
                    volume,
                    slices,
                    chosen,
                    timings,
                    gamma=gamma,
                    backend=backend,
                    device=device,
                    tokens=tokens,
                )
                entry = batch_entry(source, stamps[path], settings, gamma, record, result)
                processed += 1
            except CommandError:
                # A problem of the run (the model refuses the settings), not of this volume.
                raise
            except Exception as err:
                futures[position] = None
                entry = error_entry(path, source, err, stamps[path], settings)
                failures.append((source, entry["error"]))
                print(f"medpruner: skipping {entry['error']}", file=sys.stderr)
            _append_line(results, entry)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
        lines = compact_results(results)
        saved = processed + len(failures)
        raise Interrupted(
            f"interrupted: {saved} volume(s) of this run saved ({lines} line(s) in {results}); "
            f"{len(pending) - saved} not done; rerun the same command to resume"
        ) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if bar is not None:
        bar.close()
    compact_results(results)
    old_failures = [(str(p.resolve()), current[str(p.resolve())]["error"]) for p in not_retried]
    summary = {
        "results": str(results),
        "volumes": len(paths),
        "processed": processed,
        "already_done": skipped,
        "failed": len(failures),
        "failures": [{"source": s, "error": e} for s, e in failures],
        "failed_before": len(old_failures),
        "failures_before": [{"source": s, "error": e} for s, e in old_failures],
    }
    if as_json:
        print(to_json(summary, indent=None))
    else:
        print(
            f"{processed} volume(s) processed, {skipped} already in {results}, {len(failures)} failed"
            + "".join(f"\n  failed: {message}" for _, message in failures)
        )
        if old_failures:
            print(
                f"{len(old_failures)} volume(s) failed before and are unchanged since: not tried again "
                "(--retry-failed tries them)" + "".join(f"\n  failed before: {m}" for _, m in old_failures)
            )
    return 1 if failures or old_failures else 0
