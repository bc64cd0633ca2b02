"""A synthetic 3D VQA task whose answers depend on small, local evidence in a few slices.

Each volume is an anatomy-like body (an ellipse with a few slowly varying organs, smooth texture and a
little noise) with 0-3 lesions of five classes drawn with long-tailed frequencies. Lesions differ in
class, size, intensity and position along the slice axis. Four question types are asked about a volume
(presence, class, which third along the slice axis, count); every answer is computed from the lesion
metadata, which is kept with the volume. Splits are disjoint by construction: each volume is drawn from
its own random stream keyed by (split code, index).
"""

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

__all__ = [
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
