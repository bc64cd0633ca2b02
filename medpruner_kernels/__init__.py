"""medpruner_kernels: fused kernels for training-free visual-token pruning of 3D medical VLMs.

Importing this package is cheap: it never initialises CUDA and never imports transformers.
"""

from medpruner_kernels._dispatch import CPP_AVAILABLE, TRITON_AVAILABLE
from medpruner_kernels._validation import raise_pending_errors
from medpruner_kernels.iaf import anchor_distances, iaf_select
from medpruner_kernels.iaf_local import iaf_local_select
from medpruner_kernels.importance import attention_importance
from medpruner_kernels.merge import merge_tokens
from medpruner_kernels.nucleus import nucleus_indices, nucleus_select

__version__ = "0.1.0"

__all__ = [
    "CPP_AVAILABLE",
    "TRITON_AVAILABLE",
    "anchor_distances",
    "attention_importance",
    "iaf_local_select",
    "iaf_select",
    "merge_tokens",
    "nucleus_indices",
    "nucleus_select",
    "raise_pending_errors",
]
