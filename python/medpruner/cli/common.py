"""What every subcommand shares: the usage error, the output-folder check, the device and backend
choice, and the one-line report of an interrupted run."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path


class CommandError(Exception):
    """A usage problem reported as ``error: ...`` with exit status 2."""


def check_output_dir(path, option: str = "--out") -> Path:
    """Check at start-up, before any work, that ``path`` is a folder this run can write its results to:
    an existing writable folder, or a new one under a writable folder. Creates nothing (a run that
    fails later leaves no empty folder behind). Returns ``path`` as a :class:`Path`; a
    :class:`CommandError` naming ``option`` otherwise."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CommandError(f"{option} {out}: exists and is not a folder (name a folder for the results)")
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"{option} {out}: cannot create the folder ({existing} is a file)")
    try:
        # The only reliable test (permissions, read-only mounts, ACLs, root): write a file there.
        handle, probe = tempfile.mkstemp(prefix=".medpruner-write-test.", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        what = "write to the folder" if existing == out else f"create the folder (in {existing})"
        raise CommandError(f"{option} {out}: cannot {what}: {err.strerror or err}") from err
    return out


# Mean |difference| of two slices on the [-1, 1] scale lies in [0, 2]: a gamma outside it is a typo
# (below 0 keeps every slice, above 2 drops every slice but the first).
GAMMA_RANGE = (0.0, 2.0)


def gamma_option(text: str) -> float:
    """The argparse type of ``--gamma`` and ``--gamma-local``: a mean |difference| in [0, 2]."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"gamma must be a number, got {text!r}") from err
    if not (math.isfinite(value) and GAMMA_RANGE[0] <= value <= GAMMA_RANGE[1]):
        raise argparse.ArgumentTypeError(
            f"gamma must be in [0, 2] (a mean |difference| on the [-1, 1] scale), got {text!r}"
        )
    return value


def tau_option(text: str) -> float:
    """The argparse type of ``--tau``: exactly the values the API's ``nucleus_select`` accepts
    (:func:`medpruner_kernels._validation.check_tau`: finite and > 0; >= 1 keeps every token)."""
    from medpruner_kernels._validation import check_tau

    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"tau must be a number, got {text!r}") from err
    try:
        return check_tau(None, value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def check_backend(backend: str, device) -> None:
    """A forced ``--backend`` that cannot run here is a :class:`CommandError` saying what it needs
    (before any volume is read), instead of a traceback from the first kernel call."""
    from medpruner_kernels import _dispatch

    try:
        _dispatch.resolve_backend("iaf_select", device, backend, cpp_ops=("iaf_select",))
    except (RuntimeError, ValueError, ImportError) as err:
        raise CommandError(f"--backend {backend}: {err}") from err


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


class Interrupted(Exception):
    """Ctrl-C during a run, turned into the one line ``main`` prints (what is saved, how to go on);
    exit status 130."""
