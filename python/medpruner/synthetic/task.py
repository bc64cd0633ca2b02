"""The synthetic 3D VQA generator: volumes with lesion metadata, the questions about them, and a JSONL
writer in the generic format of :mod:`medpruner.eval.readers`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LESION_CLASSES = ("cyst", "nodule", "mass", "calcification", "ring")
# Long-tailed: the two rarest classes together are a sixth of the lesions.
CLASS_FREQUENCIES = (0.42, 0.26, 0.16, 0.10, 0.06)
QUESTION_TYPES = ("presence", "class", "third", "count")
# Each split draws volume i from the random stream seeded by (split code, i): the streams never meet.
SPLITS = {"train": 101, "val": 202, "test": 303}
DEPTH_RANGE = (16, 48)
SIDES = (64, 72, 80, 88, 96)
LESION_COUNT_PROBS = (0.3, 0.35, 0.2, 0.15)
THIRDS = ("first", "middle", "last")
LETTERS = "ABCDE"

# Per class: radius as a fraction of the slice side, intensity range, half extent along the slice axis
# (slices on each side of the centre slice). Intensity and shape separate the classes; size overlaps.
_CLASS_SHAPES = {
    "cyst": dict(radius=(0.05, 0.09), intensity=(0.06, 0.18), half_depth=(1, 3)),
    "nodule": dict(radius=(0.035, 0.06), intensity=(0.78, 0.88), half_depth=(1, 2)),
    "mass": dict(radius=(0.08, 0.12), intensity=(0.64, 0.72), half_depth=(2, 3)),
    "calcification": dict(radius=(0.022, 0.032), intensity=(0.95, 1.0), half_depth=(0, 1)),
    "ring": dict(radius=(0.06, 0.09), intensity=(0.85, 0.95), half_depth=(1, 2)),
}
_RING_CENTER = (0.15, 0.25)


@dataclass(frozen=True)
class Lesion:
    """One lesion: ``z`` its centre slice, ``y``/``x`` its in-plane centre and ``radius`` as fractions
    of the slice side, ``half_depth`` the slices it spans on each side of ``z``; ``intensity`` its value
    (a ring's rim); ``shape`` the class-specific parameters (ring centre value, mass lobes)."""

    cls: str
    z: int
    y: float
    x: float
    radius: float
    half_depth: int
    intensity: float
    shape: tuple[float, ...] = ()

    def third(self, depth: int) -> int:
        """0, 1, 2: the third of the slice axis holding the centre slice."""
        return min(2, 3 * self.z // depth)

    def slices(self, depth: int) -> range:
        return range(max(0, self.z - self.half_depth), min(depth, self.z + self.half_depth + 1))


@dataclass
class SyntheticVolume:
    """``data``: float32 ``[D, H, W]`` in [0, 1]; ``labels``: uint8 ``[D, H, W]``, 0 off lesions and
    ``1 + LESION_CLASSES.index(class)`` on a lesion's voxels (v2 also marks calcifications, with
    ``medpruner.synthetic.ct.SMALL_FINDING_LABEL``)."""

    volume_id: str
    split: str
    index: int
    data: np.ndarray
    labels: np.ndarray
    lesions: tuple[Lesion, ...]
    # Task v2 (medpruner.synthetic.ct) only: the small findings, the organs the slab holds and its
    # slice thickness in mm.
    calcifications: tuple = ()
    organs: tuple = ()
    thickness_mm: float | None = None

    @property
    def mask(self) -> np.ndarray:
        """bool ``[D, H, W]``: True on lesion voxels."""
        return self.labels > 0

    @property
    def depth(self) -> int:
        return int(self.data.shape[0])

    def token_mask(self, tokens_per_side: int) -> np.ndarray:
        """bool ``[D, T]``: the visual tokens (row-major ``tokens_per_side`` x ``tokens_per_side``
        blocks of each slice, a Qwen model's merged-token order) that hold at least one lesion voxel."""
        import torch

        mask = torch.from_numpy(self.mask.astype(np.float32))[:, None]
        blocks = torch.nn.functional.adaptive_max_pool2d(mask, tokens_per_side)
        return blocks.reshape(self.depth, -1).numpy() > 0


@dataclass
class VQASample:
    """One question about one volume. ``answer``: what the model should output ("yes"/"no", a letter or
    a digit); ``answer_text``: the option text of a multiple-choice answer (else ``answer``);
    ``category``: the question type; ``lesion_class``: the asked class for class questions, the rarest
    class present for the others, "none" without lesions."""

    sample_id: str
    volume: SyntheticVolume
    question: str
    options: dict[str, str]
    answer: str
    answer_text: str
    category: str
    lesion_class: str
    extra: dict = field(default_factory=dict)


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    return np.random.default_rng([SPLITS[split], int(index)])


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    import torch

    grid = torch.from_numpy(coarse.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(grid, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def _background(rng: np.random.Generator, depth: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic body with slowly drifting organs, smooth texture and noise; returns (image, body)."""
    zz = np.linspace(0.0, 1.0, depth, dtype=np.float32)[:, None, None]
    yy, xx = np.meshgrid(np.linspace(0, 1, side, dtype=np.float32), np.linspace(0, 1, side, dtype=np.float32),
                         indexing="ij")
    yy, xx = yy[None], xx[None]
    cy, cx = 0.5 + rng.uniform(-0.03, 0.03, 2)
    ay, ax = rng.uniform(0.36, 0.45, 2)
    # The body narrows towards both ends of the axis, as a trunk does between its slabs.
    taper = 1.0 - 0.12 * (2 * zz - 1) ** 2
    body = ((yy - cy) / (ay * taper)) ** 2 + ((xx - cx) / (ax * taper)) ** 2 <= 1.0
    image = np.where(body, rng.uniform(0.38, 0.5), 0.03).astype(np.float32)
    for _ in range(rng.integers(2, 4)):
        start = np.array([cy, cx]) + rng.uniform(-0.18, 0.18, 2)
        drift = rng.uniform(-0.08, 0.08, 2)
        axes = rng.uniform(0.07, 0.16, 2)
        phase, swell = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3)
        oy, ox = start[0] + drift[0] * zz, start[1] + drift[1] * zz
        scale = 1.0 + swell * np.sin(2 * np.pi * zz + phase)
        organ = ((yy - oy) / (axes[0] * scale)) ** 2 + ((xx - ox) / (axes[1] * scale)) ** 2 <= 1.0
        image = np.where(organ & body, np.float32(rng.uniform(0.28, 0.55)), image)
    texture = _upsample(rng.standard_normal((max(2, depth // 6), 9, 9)), (depth, side, side))
    image = image + np.where(body, 0.035 * texture, 0.0)
    image = image + rng.normal(0.0, 0.012, image.shape)
    return image.astype(np.float32), np.broadcast_to(body, (depth, side, side))


def _draw_lesion(rng: np.random.Generator, cls: str, depth: int) -> Lesion:
    spec = _CLASS_SHAPES[cls]
    radius = float(rng.uniform(*spec["radius"]))
    half_depth = int(rng.integers(spec["half_depth"][0], spec["half_depth"][1] + 1))
    z = int(rng.integers(0, depth))
    angle, distance = rng.uniform(0, 2 * np.pi), 0.22 * math.sqrt(rng.uniform())
    if cls == "ring":
        shape = (float(rng.uniform(*_RING_CENTER)),)
    elif cls == "mass":
        shape = (float(rng.integers(3, 6)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.15, 0.3)))
    else:
        shape = ()
    return Lesion(cls=cls, z=z, y=0.5 + distance * math.sin(angle), x=0.5 + distance * math.cos(angle),
                  radius=radius, half_depth=half_depth, intensity=float(rng.uniform(*spec["intensity"])),
                  shape=shape)


def _overlaps(a: Lesion, b: Lesion) -> bool:
    apart_in_depth = abs(a.z - b.z) > a.half_depth + b.half_depth + 1
    apart_in_plane = math.hypot(a.y - b.y, a.x - b.x) > a.radius + b.radius + 0.04
    return not (apart_in_depth or apart_in_plane)


def _render(image: np.ndarray, labels: np.ndarray, lesion: Lesion) -> None:
    depth, side = image.shape[0], image.shape[1]
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dy, dx = yy - lesion.y, xx - lesion.x
    distance = np.sqrt(dy**2 + dx**2)
    if lesion.cls == "mass":
        lobes, phase, depth_of_lobes = lesion.shape
        distance = distance / (1.0 + depth_of_lobes * np.sin(lobes * np.arctan2(dy, dx) + phase))
    for s in lesion.slices(depth):
        # The cross-section shrinks away from the centre slice like an ellipsoid's.
        scale = math.sqrt(max(0.0, 1.0 - ((s - lesion.z) / (lesion.half_depth + 1.0)) ** 2))
        radius = lesion.radius * scale
        # A one-pixel soft edge: alpha is 1 inside, 0 outside, linear across the boundary pixel.
        alpha = np.clip((radius - distance) * side + 0.5, 0.0, 1.0)
        value = np.full_like(alpha, lesion.intensity)
        if lesion.cls == "ring":
            inner = np.clip((0.55 * radius - distance) * side + 0.5, 0.0, 1.0)
            value = lesion.intensity * (1 - inner) + lesion.shape[0] * inner
        image[s] = image[s] * (1 - alpha) + value * alpha
        labels[s][alpha >= 0.5] = 1 + LESION_CLASSES.index(lesion.cls)


def generate_volume(split: str, index: int) -> SyntheticVolume:
    """Volume ``index`` of ``split``: the same arrays and lesions on every call."""
    rng = _rng(split, index)
    depth = int(rng.integers(DEPTH_RANGE[0], DEPTH_RANGE[1] + 1))
    side = int(rng.choice(SIDES))
    image, _ = _background(rng, depth, side)
    count = int(rng.choice(len(LESION_COUNT_PROBS), p=LESION_COUNT_PROBS))
    lesions: list[Lesion] = []
    while len(lesions) < count:
        cls = LESION_CLASSES[int(rng.choice(len(LESION_CLASSES), p=CLASS_FREQUENCIES))]
        candidate = _draw_lesion(rng, cls, depth)
        if not any(_overlaps(candidate, other) for other in lesions):
            lesions.append(candidate)
    labels = np.zeros(image.shape, dtype=np.uint8)
    for lesion in lesions:
        _render(image, labels, lesion)
    data = np.clip(image, 0.0, 1.0).astype(np.float32)
    return SyntheticVolume(f"{split}-{index:05d}", split, index, data, labels, tuple(lesions))


def answer_for(category: str, lesions, depth: int) -> str | None:
    """The model's expected answer to a question of type ``category`` from the lesion metadata alone;
    None when the question is not asked of such a volume (class: only when one class is present; third:
    only with exactly one lesion)."""
    if category == "presence":
        return "yes" if lesions else "no"
    if category == "count":
        return str(len(lesions))
    if category == "class":
        classes = {lesion.cls for lesion in lesions}
        return LETTERS[LESION_CLASSES.index(classes.pop())] if len(classes) == 1 else None
    if category == "third":
        return "ABC"[lesions[0].third(depth)] if len(lesions) == 1 else None
    raise ValueError(f"category must be one of {QUESTION_TYPES}, got {category!r}")


# Short questions: the tokenizer is byte-level, so every character is a token the model reads.
_QUESTIONS = {
    "presence": ("Is there a lesion? Answer yes or no.", {}),
    "class": ("Which lesion type is present?",
              {letter: name for letter, name in zip(LETTERS, LESION_CLASSES, strict=True)}),
    "third": ("Which third of the slices holds the lesion?",
              {letter: f"{name} third" for letter, name in zip("ABC", THIRDS, strict=True)}),
    "count": ("How many lesions are there? Answer with a number.", {}),
}


def prompt_text(question: str, options: dict[str, str]) -> str:
    """The prompt the checkpoint was trained on: the question, then one ``X. option`` line each and
    the instruction to answer with the letter (closed questions only)."""
    if not options:
        return question
    lines = [question] + [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines + ["Answer with the letter."])


def questions_for(volume: SyntheticVolume) -> list[VQASample]:
    """Every question type that has a well-defined answer for ``volume``, in :data:`QUESTION_TYPES` order."""
    present = sorted({lesion.cls for lesion in volume.lesions}, key=LESION_CLASSES.index)
    rarest = present[-1] if present else "none"
    samples = []
    for category in QUESTION_TYPES:
        answer = answer_for(category, volume.lesions, volume.depth)
        if answer is None:
            continue
        question, options = _QUESTIONS[category]
        samples.append(VQASample(
            sample_id=f"{volume.volume_id}-{category}", volume=volume,
            question=prompt_text(question, options), options=dict(options), answer=answer,
            answer_text=options.get(answer, answer), category=category,
            lesion_class=present[0] if category == "class" else rarest,
        ))
    return samples


def generate_split(split: str, num_volumes: int, *, start: int = 0) -> list[VQASample]:
    """The questions about volumes ``start .. start + num_volumes - 1`` of ``split``. The default test
    split (``generate_split("test", 200)``) has about 590 questions."""
    if isinstance(num_volumes, bool) or not isinstance(num_volumes, int) or num_volumes < 0:
        raise ValueError(f"num_volumes must be a non-negative int, got {num_volumes!r}")
    samples = []
    for index in range(start, start + num_volumes):
        samples.extend(questions_for(generate_volume(split, index)))
    return samples


def demo_volume() -> SyntheticVolume:
    """The first test volume with at least two lesions in different thirds of the slice axis: a
    volume to show lesion-focused token heatmaps on (``mask`` marks its lesion voxels)."""
    index = 0
    while True:
        volume = generate_volume("test", index)
        if len({lesion.third(volume.depth) for lesion in volume.lesions}) >= 2:
            return volume
        index += 1


def write_jsonl(samples, directory, *, name: str = "questions.jsonl", category: str = "type") -> Path:
    """Write ``samples`` as the generic JSONL of :func:`medpruner.eval.readers.read_dataset` (format
    ``"jsonl"``) into ``directory``: one ``volumes/<volume_id>.npy`` per volume (float32 ``[D, H, W]`` in
    [0, 1]) and ``name`` with ``id``, ``volume``, ``question``, ``options``, ``answer`` (the option text
    for closed questions), ``answer_letter`` and ``category`` (the question type, or with
    ``category="class"`` the row's ``lesion_class``) and ``unit_range: true`` (the volumes are already
    in [0, 1]: the reader takes them as they are, no windowing). Returns the JSONL path."""
    if category not in ("type", "class"):
        raise ValueError(f"category must be 'type' or 'class', got {category!r}")
    root = Path(directory)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    written = set()
    path = root / name
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            relative = f"volumes/{sample.volume.volume_id}.npy"
            if sample.volume.volume_id not in written:
                np.save(root / relative, sample.volume.data)
                written.add(sample.volume.volume_id)
            row = {"id": sample.sample_id, "volume": relative, "question": sample.question,
                   "answer": sample.answer_text,
                   "category": sample.category if category == "type" else sample.lesion_class,
                   "question_type": sample.category, "lesion_class": sample.lesion_class, "unit_range": True}
            if sample.options:
                row["options"] = sample.options
                row["answer_letter"] = sample.answer
            handle.write(json.dumps(row) + "\n")
    return path
