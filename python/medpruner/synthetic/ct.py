"""Synthetic 3D VQA task v2: CT-like volumes drawn for a model that sees 16 visual tokens per slice.

Geometry is physical along the slice axis. Each volume is a slab of an abdomen "atlas" 0-320 mm long,
cut at its own slice thickness (1-5 mm, one per volume) into 12-24 slices. Organs are ellipsoids placed
in the atlas (liver high, kidneys lower, bowel loops low), so which organs a slab holds, and where they
appear and vanish, follows from the slab's position and thickness; the spine (vertebrae with discs every
26-32 mm, partial-volume averaged over the slice) and the aorta run through every slice. Texture varies
on a 10 mm scale along the axis and noise grows for thin slices (as in CT, noise ~ 1/sqrt(thickness)):
thin slices barely change from one to the next, thick ones jump, which is what IAF keys on.

Findings: 0-3 lesions of five long-tailed classes whose extent along the axis is physical (1 slice for a
small nodule at 5 mm, the whole slab for a mass at 1 mm), and the small finding, calcifications: 0-2
bright spots of a few pixels at the model's resolution, each on 1 or 2 slices. Question types: presence,
class, third (of the slice axis), count (lesions only) and calcification (yes/no). Intensities are
drawn on [0, 1] as if windowed (air 0, fat ~0.23, organs 0.5-0.65, bone ~0.88, calcium ~1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medpruner.synthetic.task import SyntheticVolume, VQASample, prompt_text

VERSION = 2
# The model-facing grid the task is drawn for: 64-pixel slices, 8-pixel patches merged 2 x 2, so
# 8 x 8 patches and 4 x 4 = 16 visual tokens per slice.
MODEL_RESOLUTION = 64
MODEL_PATCH = 8
MODEL_MERGE = 2
TOKENS_PER_SLICE = (MODEL_RESOLUTION // (MODEL_PATCH * MODEL_MERGE)) ** 2

LESION_CLASSES = ("cyst", "nodule", "mass", "ring", "lipoma")
# Long-tailed: the two rarest classes together are 15% of the lesions, the rarest 5%.
CLASS_FREQUENCIES = (0.42, 0.27, 0.16, 0.10, 0.05)
SMALL_FINDING = "calcification"
# Label value of calcification voxels (lesions are 1 + class index).
SMALL_FINDING_LABEL = len(LESION_CLASSES) + 1
QUESTION_TYPES = ("presence", "class", "third", "count", "calcification")
# Answer set sizes, for uniform-guess chance.
ANSWER_SET_SIZES = {"presence": 2, "class": len(LESION_CLASSES), "third": 3, "count": 4, "calcification": 2}
# Own split codes (not v1's): volume i of a split is drawn from the stream seeded by (2, code, i).
SPLITS = {"train": 111, "val": 222, "test": 333}
DEPTH_RANGE = (12, 24)
SIDES = (64, 80, 96)
THICKNESSES_MM = (1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
# Thick slices are the common case in VQA releases (M3D resamples to 32 slices); thin ones still a fifth.
THICKNESS_PROBS = (0.1, 0.1, 0.15, 0.2, 0.2, 0.25)
ATLAS_MM = 320.0
LESION_COUNT_PROBS = (0.3, 0.35, 0.2, 0.15)
CALCIFICATION_COUNT_PROBS = (0.5, 0.3, 0.2)
THIRDS = ("first", "middle", "last")
LETTERS = "ABCDE"
_ABDOMEN_CENTRE = (0.47, 0.5)

# Per class: in-plane radius (fraction of the side), intensity, axial half length (mm): the slice count
# follows from the thickness (a small nodule is 1 slice at 5 mm, a mass fills a 1 mm slab).
_CLASS_SHAPES = {
    "cyst": dict(radius=(0.04, 0.08), intensity=(0.33, 0.38), half_mm=(5, 20)),
    "nodule": dict(radius=(0.025, 0.045), intensity=(0.74, 0.80), half_mm=(1.5, 6)),
    "mass": dict(radius=(0.08, 0.12), intensity=(0.67, 0.72), half_mm=(12, 35)),
    "ring": dict(radius=(0.05, 0.08), intensity=(0.80, 0.85), half_mm=(6, 18)),
    "lipoma": dict(radius=(0.04, 0.07), intensity=(0.10, 0.14), half_mm=(5, 15)),
}
_RING_CENTER = (0.34, 0.40)
_CALCIFICATION = dict(radius=(0.022, 0.032), intensity=(0.97, 1.0))

# Organs: name, intensity, centre (y, x) ranges (fractions of the side), semi-axes (y, x) ranges, atlas
# centre (mm) range, axial half length (mm) range, probability of being there at all.
_ORGANS = (
    ("liver", (0.56, 0.61), ((0.40, 0.46), (0.29, 0.35)), ((0.11, 0.15), (0.10, 0.13)), (60, 95), (45, 75), 1.0),
    ("stomach", (0.03, 0.07), ((0.33, 0.39), (0.58, 0.65)), ((0.05, 0.08), (0.06, 0.09)), (70, 110), (20, 40), 0.8),
    ("spleen", (0.51, 0.55), ((0.44, 0.52), (0.67, 0.72)), ((0.05, 0.07), (0.04, 0.055)), (80, 110), (25, 45), 0.9),
    ("pancreas", (0.49, 0.53), ((0.50, 0.54), (0.45, 0.55)), ((0.02, 0.03), (0.07, 0.10)), (115, 135), (10, 20), 0.8),
    ("kidney", (0.60, 0.64), ((0.58, 0.63), (0.32, 0.36)), ((0.045, 0.06), (0.03, 0.04)), (135, 165), (25, 40), 0.95),
    ("kidney", (0.60, 0.64), ((0.58, 0.63), (0.64, 0.68)), ((0.045, 0.06), (0.03, 0.04)), (135, 165), (25, 40), 0.95),
    ("bladder", (0.40, 0.43), ((0.40, 0.48), (0.45, 0.55)), ((0.07, 0.10), (0.08, 0.11)), (285, 310), (20, 35), 0.9),
)
_BOWEL_LOOPS = (8, 16)
_BOWEL_ZONE_MM = (90, 320)
_VESSELS = (12, 24)
_RIB_END_MM = 190.0
# Texture layers: (nodes per side, axial scale in mm, amplitude): organ-scale shading, and mottling that
# decorrelates within 4 mm (what makes 5 mm slices jump and 1 mm slices nearly repeat).
_TEXTURES = ((9, 20.0, 0.03), (15, 6.0, 0.045), (25, 3.0, 0.08))
# Noise sigma at 2.5 mm; it scales with 1/sqrt(thickness).
_NOISE = (0.006, 0.009)


@dataclass(frozen=True)
class Finding:
    """A lesion or a calcification: slices ``first .. last`` (inclusive), in-plane centre ``y``/``x``
    and largest ``radius`` as fractions of the side; ``intensity`` its value (a ring's rim); ``shape``
    class-specific parameters (ring centre value, mass lobes); ``centre_mm``/``half_length_mm`` its
    axial position in the slab and half length."""

    cls: str
    first: int
    last: int
    y: float
    x: float
    radius: float
    intensity: float
    centre_mm: float
    half_length_mm: float
    shape: tuple[float, ...] = ()

    @property
    def z(self) -> int:
        """The centre slice of the span."""
        return (self.first + self.last) // 2

    @property
    def extent(self) -> int:
        """Slices spanned."""
        return self.last - self.first + 1

    def third(self, depth: int) -> int:
        """0, 1, 2: the third of the slice axis holding the centre slice."""
        return min(2, 3 * self.z // depth)

    def slices(self, depth: int) -> range:
        return range(max(0, self.first), min(depth, self.last + 1))


@dataclass(frozen=True)
class Organ:
    """An organ the slab holds: visible on slices ``first .. last`` (inclusive)."""

    name: str
    first: int
    last: int
    intensity: float


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    return np.random.default_rng([VERSION, SPLITS[split], int(index)])


def _soft(signed_distance_px: np.ndarray) -> np.ndarray:
    """Coverage of a pixel by a shape whose boundary is ``signed_distance_px`` pixels away (positive
    inside): 1 inside, 0 outside, linear across the boundary pixel."""
    return np.clip(signed_distance_px + 0.5, 0.0, 1.0).astype(np.float32)


class _Canvas:
    """The slab being drawn: ``image`` ``[D, S, S]``, slice centres ``z`` (mm, slab coordinates),
    pixel-centre grids ``yy``/``xx`` (fractions of the side)."""

    def __init__(self, depth: int, side: int, thickness: float):
        self.depth, self.side, self.thickness = depth, side, thickness
        self.z = (np.arange(depth, dtype=np.float32) + 0.5) * thickness
        coords = (np.arange(side, dtype=np.float32) + 0.5) / side
        self.yy, self.xx = np.meshgrid(coords, coords, indexing="ij")
        self.image = np.zeros((depth, side, side), dtype=np.float32)
        self.labels = np.zeros((depth, side, side), dtype=np.uint8)

    def ellipsoid(self, cy, cx, ay, ax, centre_mm, half_mm, drift=(0.0, 0.0)) -> np.ndarray:
        """Per-pixel coverage ``[D, S, S]`` of an ellipsoid with in-plane semi-axes ``ay``/``ax``
        (fractions) and axial half length ``half_mm`` centred at ``centre_mm``, its in-plane centre
        moving by ``drift`` (fractions) from one axial end to the other (organs are not upright)."""
        coverage = np.zeros(self.image.shape, dtype=np.float32)
        t = (self.z - centre_mm) / half_mm
        for s in np.flatnonzero(np.abs(t) < 1.0):
            scale = math.sqrt(1.0 - t[s] ** 2)
            oy, ox = cy + 0.5 * drift[0] * t[s], cx + 0.5 * drift[1] * t[s]
            q = np.sqrt(((self.yy - oy) / ay) ** 2 + ((self.xx - ox) / ax) ** 2)
            coverage[s] = _soft((scale - q) * min(ay, ax) * self.side)
        return coverage

    def slab_fraction(self, centre_mm, half_mm) -> np.ndarray:
        """``[D]``: the fraction of each slice's slab inside ``centre_mm +- half_mm`` (partial volume)."""
        low = np.maximum(self.z - self.thickness / 2, centre_mm - half_mm)
        high = np.minimum(self.z + self.thickness / 2, centre_mm + half_mm)
        return (np.clip(high - low, 0.0, None) / self.thickness).astype(np.float32)

    def paint(self, coverage: np.ndarray, value) -> None:
        self.image *= 1.0 - coverage
        self.image += coverage * np.asarray(value, dtype=np.float32)

    def paint_rows(self, rows: np.ndarray, coverage: np.ndarray, value) -> None:
        """:meth:`paint` on slices ``rows`` only (``coverage`` ``[len(rows), S, S]``)."""
        self.image[rows] = self.image[rows] * (1.0 - coverage) + coverage * np.float32(value)


def _visible(coverage: np.ndarray) -> tuple[int, int] | None:
    rows = np.flatnonzero(coverage.reshape(coverage.shape[0], -1).max(1) >= 0.5)
    return (int(rows[0]), int(rows[-1])) if rows.size else None


def _anatomy(rng: np.random.Generator, canvas: _Canvas, slab_start: float) -> tuple[tuple[Organ, ...], dict]:
    """Body, muscle wall, organs, bowel loops, aorta and spine; returns the visible organs and the
    regions findings must avoid."""
    atlas_z = canvas.z + slab_start
    cy, cx = np.array(_ABDOMEN_CENTRE) + rng.uniform(-0.02, 0.02, 2)
    ay, ax = rng.uniform(0.30, 0.35), rng.uniform(0.40, 0.45)
    period, phase = rng.uniform(200, 300), rng.uniform(0, 2 * np.pi)
    breathe = (1.0 + 0.05 * np.sin(2 * np.pi * atlas_z / period + phase))[:, None, None]
    q = np.sqrt(((canvas.yy - cy) / ay) ** 2 + ((canvas.xx - cx) / ax) ** 2)[None] / breathe
    body = _soft((1.0 - q) * ay * canvas.side)
    wall = rng.uniform(0.025, 0.04)
    inner = _soft((1.0 - wall / ay - q) * ay * canvas.side)
    canvas.image[:] = rng.uniform(0.0, 0.02)
    canvas.paint(body, rng.uniform(0.47, 0.52))
    canvas.paint(inner, rng.uniform(0.20, 0.26))

    organs = []
    for name, intensity, (ys, xs), (ays, axs), centre, half, chance in _ORGANS:
        # Every draw is made whether or not the organ is there, so one organ's absence does not
        # reshuffle the rest of the volume.
        values = (rng.uniform(*intensity), rng.uniform(*ys), rng.uniform(*xs), rng.uniform(*ays),
                  rng.uniform(*axs), rng.uniform(*centre), rng.uniform(*half), rng.uniform(-0.06, 0.06, 2),
                  rng.uniform())
        value, oy, ox, oay, oax, oz, hz, drift, there = values
        if there >= chance:
            continue
        coverage = canvas.ellipsoid(oy, ox, oay, oax, oz - slab_start, hz, drift) * inner
        canvas.paint(coverage, value)
        span = _visible(coverage)
        if span:
            organs.append(Organ(name, *span, float(value)))
    for _ in range(int(rng.integers(*_BOWEL_LOOPS, endpoint=True))):
        oy, ox = rng.uniform(0.30, 0.56), rng.uniform(0.30, 0.70)
        radius, hz, oz = rng.uniform(0.03, 0.055), rng.uniform(5, 15), rng.uniform(*_BOWEL_ZONE_MM)
        wall_value, gas, drift = rng.uniform(0.48, 0.53), rng.uniform(0.02, 0.08), rng.uniform(-0.08, 0.08, 2)
        outer = canvas.ellipsoid(oy, ox, radius, radius, oz - slab_start, hz, drift) * inner
        canvas.paint(outer, wall_value)
        canvas.paint(canvas.ellipsoid(oy, ox, 0.6 * radius, 0.6 * radius, oz - slab_start, 0.8 * hz, drift) * inner,
                     gas)
        span = _visible(outer)
        if span:
            organs.append(Organ("bowel", *span, float(wall_value)))

    # Vessels: tubes oblique to the axis, so their cross-sections move from slice to slice.
    for _ in range(int(rng.integers(*_VESSELS, endpoint=True))):
        vy, vx = rng.uniform(0.30, 0.62), rng.uniform(0.25, 0.75)
        radius, value = rng.uniform(0.014, 0.022), rng.uniform(0.58, 0.68)
        slope = rng.uniform(-0.004, 0.004, 2)
        start, length = rng.uniform(0, ATLAS_MM), rng.uniform(40, 150)
        tube = canvas.ellipsoid(vy, vx, radius, radius, start - slab_start, length, slope * length * 2) * inner
        canvas.paint(tube, value)

    # Ribs (upper abdomen): each crosses the wall on both sides over 8-12 mm of the axis, at its own
    # angle; slices that cut a rib partly show it fainter (partial volume).
    rib_period, rib_phase = rng.uniform(22, 26), rng.uniform(0, 26)
    for k in range(int(_RIB_END_MM // 22) + 2):
        rib_mm, rib_half = rib_phase + k * rib_period, rng.uniform(4, 6)
        angle, rib_value, rib_r = rng.uniform(0.55, 0.9) * np.pi, rng.uniform(0.84, 0.9), rng.uniform(0.018, 0.024)
        if rib_mm > _RIB_END_MM:
            continue
        fraction = canvas.slab_fraction(rib_mm - slab_start, rib_half)
        if not fraction.any():
            continue
        rows = np.flatnonzero(fraction)
        for sign in (-1.0, 1.0):
            ry = cy - (ay - wall / 2) * math.cos(angle)
            rx = cx + sign * (ax - wall / 2) * math.sin(angle)
            disk = _soft((rib_r - np.hypot(canvas.yy - ry, canvas.xx - rx)) * canvas.side)
            canvas.paint_rows(rows, fraction[rows, None, None] * disk[None], rib_value)

    spine_y, spine_x, spine_r = rng.uniform(0.74, 0.78), 0.5 + rng.uniform(-0.01, 0.01), rng.uniform(0.045, 0.055)
    aorta_y = spine_y - spine_r - rng.uniform(0.03, 0.04)
    aorta_x, aorta_r = rng.uniform(0.46, 0.48), rng.uniform(0.025, 0.03)
    canvas.paint(_soft((aorta_r - np.hypot(canvas.yy - aorta_y, canvas.xx - aorta_x)) * canvas.side)[None],
                 rng.uniform(0.72, 0.78))
    # Vertebral bodies with discs: the disc fraction of each slice's slab (partial volume) blends them.
    disc_period, disc_mm, disc_phase = rng.uniform(26, 32), rng.uniform(5, 7), rng.uniform(0, 32)
    offsets = (np.arange(16, dtype=np.float32) + 0.5) / 16 - 0.5
    samples = atlas_z[:, None] + offsets[None] * canvas.thickness
    disc = (((samples + disc_phase) % disc_period) < disc_mm).mean(1).astype(np.float32)[:, None, None]
    distance = np.hypot(canvas.yy - spine_y, canvas.xx - spine_x)[None]
    cortex, marrow, disc_value = rng.uniform(0.86, 0.90), rng.uniform(0.60, 0.65), rng.uniform(0.48, 0.52)
    bone = np.where(distance < 0.7 * spine_r, marrow, cortex).astype(np.float32)
    canvas.paint(_soft((spine_r - distance) * canvas.side), (1 - disc) * bone + disc * disc_value)

    avoid = {"spine": (spine_y, spine_x, spine_r), "aorta": (aorta_y, aorta_x, aorta_r),
             "body": (cy, cx, ay, ax, wall)}
    return tuple(organs), avoid


def _texture_and_noise(rng: np.random.Generator, canvas: _Canvas, inside: np.ndarray) -> None:
    """Tissue texture inside the body, one layer per (nodes per side, axial scale in mm, amplitude)
    of :data:`_TEXTURES`, and noise whose sigma grows for thin slices (CT noise ~ 1/sqrt(thickness))."""
    import torch

    for nodes_per_side, scale_mm, amplitude in _TEXTURES:
        nodes = rng.standard_normal((int(canvas.z[-1] // scale_mm) + 2, nodes_per_side, nodes_per_side))
        position = canvas.z / scale_mm
        low = np.floor(position).astype(int)
        weight = (position - low)[:, None, None]
        coarse = ((1 - weight) * nodes[low] + weight * nodes[low + 1]).astype(np.float32)
        texture = torch.nn.functional.interpolate(torch.from_numpy(coarse)[:, None], size=(canvas.side, canvas.side),
                                                  mode="bilinear", align_corners=True)[:, 0].numpy()
        canvas.image += amplitude * texture * inside
    sigma = rng.uniform(*_NOISE) * math.sqrt(2.5 / canvas.thickness)
    canvas.image += rng.normal(0.0, sigma, canvas.image.shape).astype(np.float32)


def _place(rng, radius: float, avoid: dict, placed, first: int, last: int) -> tuple[float, float] | None:
    """An in-plane centre inside the abdomen, clear of the spine, the aorta and every placed finding
    whose slices come within one slice of ``first .. last``; None after 50 tries."""
    cy, cx = _ABDOMEN_CENTRE
    for _ in range(50):
        angle, distance = rng.uniform(0, 2 * np.pi), 0.22 * math.sqrt(rng.uniform())
        y, x = cy + distance * math.sin(angle), cx + 0.9 * distance * math.cos(angle)
        clear = all(math.hypot(y - ay, x - ax) > ar + radius + 0.02 for ay, ax, ar in (avoid["spine"], avoid["aorta"]))
        clear = clear and all(
            math.hypot(y - other.y, x - other.x) > other.radius + radius + 0.04
            or other.first > last + 1 or other.last < first - 1
            for other in placed)
        if clear:
            return y, x
    return None


def _draw_lesion(rng, cls: str, canvas: _Canvas, avoid: dict, placed) -> Finding | None:
    spec = _CLASS_SHAPES[cls]
    radius = float(rng.uniform(*spec["radius"]))
    intensity = float(rng.uniform(*spec["intensity"]))
    half_mm = float(rng.uniform(*spec["half_mm"]))
    centre_mm = float(rng.uniform(0.0, canvas.depth * canvas.thickness))
    inside = np.flatnonzero(np.abs(canvas.z - centre_mm) <= half_mm)
    nearest = int(np.argmin(np.abs(canvas.z - centre_mm)))
    first, last = (int(inside[0]), int(inside[-1])) if inside.size else (nearest, nearest)
    if cls == "ring":
        shape = (float(rng.uniform(*_RING_CENTER)),)
    elif cls == "mass":
        shape = (float(rng.integers(3, 6)), float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0.15, 0.3)))
    else:
        shape = ()
    where = _place(rng, radius, avoid, placed, first, last)
    if where is None:
        return None
    return Finding(cls, first, last, where[0], where[1], radius, intensity, centre_mm, half_mm, shape)


def _draw_calcification(rng, canvas: _Canvas, avoid: dict, placed) -> Finding | None:
    radius = float(rng.uniform(*_CALCIFICATION["radius"]))
    intensity = float(rng.uniform(*_CALCIFICATION["intensity"]))
    extent = int(rng.integers(1, 3))
    first = int(rng.integers(0, canvas.depth - extent + 1))
    last = first + extent - 1
    where = _place(rng, radius, avoid, placed, first, last)
    if where is None:
        return None
    centre_mm = float(canvas.z[first:last + 1].mean())
    return Finding(SMALL_FINDING, first, last, where[0], where[1], radius, intensity, centre_mm,
                   extent * canvas.thickness / 2, ())


def _render(canvas: _Canvas, finding: Finding) -> None:
    side = canvas.side
    dy, dx = canvas.yy - finding.y, canvas.xx - finding.x
    distance = np.sqrt(dy**2 + dx**2)
    if finding.cls == "mass":
        lobes, phase, depth_of_lobes = finding.shape
        distance = distance / (1.0 + depth_of_lobes * np.sin(lobes * np.arctan2(dy, dx) + phase))
    label = SMALL_FINDING_LABEL if finding.cls == SMALL_FINDING else 1 + LESION_CLASSES.index(finding.cls)
    for s in finding.slices(canvas.depth):
        if finding.cls == SMALL_FINDING:
            scale = 1.0
        else:
            # An ellipsoid's cross-section; the half slice added keeps every spanned slice visible.
            dz = (canvas.z[s] - finding.centre_mm) / (finding.half_length_mm + canvas.thickness / 2)
            scale = math.sqrt(max(0.0, 1.0 - dz**2))
        radius = max(finding.radius * scale, 0.8 / side)
        alpha = _soft((radius - distance) * side)
        value = np.full_like(alpha, finding.intensity)
        if finding.cls == "ring":
            centre = _soft((0.55 * radius - distance) * side)
            value = finding.intensity * (1 - centre) + finding.shape[0] * centre
        canvas.image[s] = canvas.image[s] * (1 - alpha) + value * alpha
        canvas.labels[s][alpha >= 0.5] = label


def generate_volume(split: str, index: int) -> SyntheticVolume:
    """Volume ``index`` of ``split``: the same arrays, findings and organs on every call.
    ``lesions`` holds the classed lesions, ``calcifications`` the small findings; ``labels`` marks
    lesions with ``1 + class index`` and calcifications with :data:`SMALL_FINDING_LABEL`."""
    rng = _rng(split, index)
    depth = int(rng.integers(DEPTH_RANGE[0], DEPTH_RANGE[1] + 1))
    side = int(rng.choice(SIDES))
    thickness = float(rng.choice(THICKNESSES_MM, p=THICKNESS_PROBS))
    slab_start = float(rng.uniform(0.0, max(0.0, ATLAS_MM - depth * thickness)))
    canvas = _Canvas(depth, side, thickness)
    organs, avoid = _anatomy(rng, canvas, slab_start)
    cy, cx, ay, ax, _ = avoid["body"]
    inside = (((canvas.yy - cy) / ay) ** 2 + ((canvas.xx - cx) / ax) ** 2 <= 1.0)[None].astype(np.float32)
    _texture_and_noise(rng, canvas, inside)
    placed: list[Finding] = []
    count = int(rng.choice(len(LESION_COUNT_PROBS), p=LESION_COUNT_PROBS))
    while len(placed) < count:
        cls = LESION_CLASSES[int(rng.choice(len(LESION_CLASSES), p=CLASS_FREQUENCIES))]
        lesion = _draw_lesion(rng, cls, canvas, avoid, placed)
        if lesion is not None:
            placed.append(lesion)
    lesions = tuple(placed)
    calcifications = []
    for _ in range(int(rng.choice(len(CALCIFICATION_COUNT_PROBS), p=CALCIFICATION_COUNT_PROBS))):
        spot = _draw_calcification(rng, canvas, avoid, placed)
        while spot is None:
            spot = _draw_calcification(rng, canvas, avoid, placed)
        placed.append(spot)
        calcifications.append(spot)
    for finding in placed:
        _render(canvas, finding)
    data = np.clip(canvas.image, 0.0, 1.0).astype(np.float32)
    return SyntheticVolume(f"{split}-v2-{index:05d}", split, index, data, canvas.labels, lesions,
                           calcifications=tuple(calcifications), organs=organs, thickness_mm=thickness)


def answer_for(category: str, lesions, depth: int, calcifications=()) -> str | None:
    """The expected answer to a question of type ``category`` from the finding metadata alone; None
    when the question is not asked of such a volume (class: only when one class is present; third:
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
    if category == "calcification":
        return "yes" if calcifications else "no"
    raise ValueError(f"category must be one of {QUESTION_TYPES}, got {category!r}")


# Short questions: the tokenizer is byte-level, so every character is a token the model reads.
_QUESTIONS = {
    "presence": ("Is there a lesion? Answer yes or no.", {}),
    "class": ("Which lesion type is present?",
              {letter: name for letter, name in zip(LETTERS, LESION_CLASSES, strict=True)}),
    "third": ("Which third of the slices holds the lesion?",
              {letter: f"{name} third" for letter, name in zip("ABC", THIRDS, strict=True)}),
    "count": ("How many lesions are there? Answer with a number.", {}),
    "calcification": ("Is there a calcification? Answer yes or no.", {}),
}


def questions_for(volume: SyntheticVolume) -> list[VQASample]:
    """Every question type with a well-defined answer for ``volume``, in :data:`QUESTION_TYPES` order.
    ``lesion_class``: the asked class for class questions, "calcification" or "none" for calcification
    questions, else the rarest lesion class present ("none" without lesions)."""
    present = sorted({lesion.cls for lesion in volume.lesions}, key=LESION_CLASSES.index)
    rarest = present[-1] if present else "none"
    samples = []
    for category in QUESTION_TYPES:
        answer = answer_for(category, volume.lesions, volume.depth, volume.calcifications)
        if answer is None:
            continue
        question, options = _QUESTIONS[category]
        if category == "class":
            lesion_class = present[0]
        elif category == "calcification":
            lesion_class = SMALL_FINDING if volume.calcifications else "none"
        else:
            lesion_class = rarest
        samples.append(VQASample(
            sample_id=f"{volume.volume_id}-{category}", volume=volume,
            question=prompt_text(question, options), options=dict(options), answer=answer,
            answer_text=options.get(answer, answer), category=category, lesion_class=lesion_class,
        ))
    return samples


def generate_split(split: str, num_volumes: int, *, start: int = 0) -> list[VQASample]:
    """The questions about volumes ``start .. start + num_volumes - 1`` of ``split`` (about 3.9 per
    volume)."""
    if isinstance(num_volumes, bool) or not isinstance(num_volumes, int) or num_volumes < 0:
        raise ValueError(f"num_volumes must be a non-negative int, got {num_volumes!r}")
    samples = []
    for index in range(start, start + num_volumes):
        samples.extend(questions_for(generate_volume(split, index)))
    return samples


def demo_volume() -> SyntheticVolume:
    """The first test volume with lesions in two thirds of the slice axis and a calcification."""
    index = 0
    while True:
        volume = generate_volume("test", index)
        if volume.calcifications and len({lesion.third(volume.depth) for lesion in volume.lesions}) >= 2:
            return volume
        index += 1
