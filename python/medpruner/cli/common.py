"""What every subcommand shares: the usage error and the device choice."""

from __future__ import annotations


class CommandError(Exception):
    """A usage problem reported as ``error: ...`` with exit status 2."""


def pick_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return device


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
