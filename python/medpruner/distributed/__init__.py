"""Archive-scale runs on Ray Data (``pip install "ray[data]"``): :mod:`.job`. Importing this package
does not import Ray; starting a job does."""

from medpruner.distributed.job import ModelRef, ModelStage, RayOptions, connect, prune_job, read_manifest

__all__ = ["ModelRef", "ModelStage", "RayOptions", "connect", "prune_job", "read_manifest"]
