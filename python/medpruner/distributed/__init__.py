"""Archive-scale runs on Ray Data (``pip install "ray[data]"``): :mod:`.job` (prune), :mod:`.eval_job`
(eval). Importing this package does not import Ray; starting a job does."""

from medpruner.distributed.eval_job import EvalModelRef, EvalStage, eval_job
from medpruner.distributed.job import ModelRef, ModelStage, RayOptions, connect, prune_job, read_manifest

__all__ = [
    "EvalModelRef", "EvalStage", "ModelRef", "ModelStage", "RayOptions", "connect", "eval_job", "prune_job",
    "read_manifest",
]
