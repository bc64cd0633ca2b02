"""A synthetic 3D VQA task whose answers depend on small, local evidence in a few slices.

Each volume is an anatomy-like body (an ellipse with a few slowly varying organs, smooth texture and a
little noise) with 0-3 lesions of five classes drawn with long-tailed frequencies. Lesions differ in
class, size, intensity and position along the slice axis. Four question types are asked about a volume
(presence, class, which third along the slice axis, count); every answer is computed from the lesion
metadata, which is kept with the volume. Splits are disjoint by construction: each volume is drawn from
its own random stream keyed by (split code, index).

Task v2 (:mod:`medpruner.synthetic.ct`, ``task_module(2)``) has the same functions over CT-like volumes
drawn for 16 visual tokens per slice: organs that appear and vanish along the slice axis, a slice
thickness per volume, lesions spanning 1 to 10+ slices and a small-finding question (calcification).
"""

from types import ModuleType

from medpruner.synthetic import ct
from medpruner.synthetic.task import (
    CLASS_FREQUENCIES,
    LESION_CLASSES,
    QUESTION_TYPES,
    SPLITS,
    Lesion,
    SyntheticVolume,
    VQASample,
    answer_for,
    demo_volume,
    generate_split,
    generate_volume,
    prompt_text,
    questions_for,
    write_jsonl,
)

TASK_VERSIONS = (1, 2)


def task_module(version: int) -> ModuleType:
    """The generator module of task ``version``: 1 is :mod:`medpruner.synthetic.task`, 2 is
    :mod:`medpruner.synthetic.ct`. Both have ``LESION_CLASSES``, ``CLASS_FREQUENCIES``,
    ``QUESTION_TYPES``, ``SPLITS``, ``generate_volume``, ``questions_for``, ``generate_split``,
    ``answer_for`` and ``demo_volume``."""
    from medpruner.synthetic import task

    modules = {1: task, 2: ct}
    if version not in modules:
        raise ValueError(f"version must be one of {TASK_VERSIONS}, got {version!r}")
    return modules[version]


__all__ = [
    "TASK_VERSIONS",
    "ct",
    "task_module",
    "CLASS_FREQUENCIES",
    "LESION_CLASSES",
    "QUESTION_TYPES",
    "SPLITS",
    "Lesion",
    "SyntheticVolume",
    "VQASample",
    "answer_for",
    "demo_volume",
    "generate_split",
    "generate_volume",
    "prompt_text",
    "questions_for",
    "write_jsonl",
]
