"""The synthetic 3D VQA generators (v1: medpruner.synthetic.task; v2: medpruner.synthetic.ct):
determinism, disjoint splits, the drawn volumes against the issues' ranges, answers recomputed from the
rendered voxels, and the JSONL round trip through the eval reader. v2 also: 16 tokens per slice at the
model's resolution, lesion extents of 1 to 10+ slices, organs appearing and vanishing, slice-to-slice
change growing with the slice thickness and of real anatomy's size."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from medpruner.eval.readers import read_dataset
from medpruner.synthetic import (
    CLASS_FREQUENCIES,
    LESION_CLASSES,
    QUESTION_TYPES,
    SPLITS,
    answer_for,
    ct,
    demo_volume,
    generate_split,
    generate_volume,
    questions_for,
    task_module,
    write_jsonl,
)
from scipy import ndimage

IDENTITY_WINDOW = (0.5, 1.0)


def _digest(volume) -> str:
    return hashlib.sha256(volume.data.tobytes() + repr(volume.lesions).encode()).hexdigest()


@pytest.fixture(scope="module")
def train_volumes():
    return [generate_volume("train", i) for i in range(60)]


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("index", [0, 7])
def test_volume_is_deterministic(split, index):
    first, second = generate_volume(split, index), generate_volume(split, index)
    np.testing.assert_array_equal(first.data, second.data)
    np.testing.assert_array_equal(first.mask, second.mask)
    assert first.lesions == second.lesions
    assert [(s.question, s.answer) for s in questions_for(first)] == [
        (s.question, s.answer) for s in questions_for(second)
    ]


def test_splits_are_disjoint():
    digests = {split: {_digest(generate_volume(split, i)) for i in range(25)} for split in SPLITS}
    ids = {split: {generate_volume(split, i).volume_id for i in range(25)} for split in SPLITS}
    for split in SPLITS:
        assert len(digests[split]) == 25, "volumes within a split repeat"
        for other in SPLITS:
            if other != split:
                assert not digests[split] & digests[other]
                assert not ids[split] & ids[other]


def test_volume_ranges(train_volumes):
    depths = [v.depth for v in train_volumes]
    sides = {v.data.shape[1] for v in train_volumes}
    assert 16 <= min(depths) and max(depths) <= 48 and max(depths) - min(depths) >= 20
    assert sides <= {64, 72, 80, 88, 96} and len(sides) >= 3
    for volume in train_volumes:
        assert volume.data.dtype == np.float32 and volume.data.ndim == 3
        assert volume.data.shape[1] == volume.data.shape[2]
        assert volume.data.min() >= 0.0 and volume.data.max() <= 1.0
        assert volume.mask.shape == volume.data.shape
    counts = Counter(len(v.lesions) for v in train_volumes)
    assert set(counts) == {0, 1, 2, 3}


def test_lesion_classes_are_long_tailed():
    drawn = Counter(lesion.cls for i in range(400) for lesion in generate_volume("val", i).lesions)
    total = sum(drawn.values())
    for cls, frequency in zip(LESION_CLASSES, CLASS_FREQUENCIES, strict=True):
        # a binomial proportion over ~450 lesions: 4 standard errors
        assert abs(drawn[cls] / total - frequency) < 4 * np.sqrt(frequency * (1 - frequency) / total), cls
    assert drawn["ring"] < drawn["cyst"] / 4


def test_lesions_vary_in_size_intensity_and_position(train_volumes):
    lesions = [(lesion, v.depth) for v in train_volumes for lesion in v.lesions]
    for cls in ("cyst", "nodule"):
        of_class = [lesion for lesion, _ in lesions if lesion.cls == cls]
        assert len({round(lesion.radius, 3) for lesion in of_class}) > 3
        assert len({round(lesion.intensity, 3) for lesion in of_class}) > 3
    assert {lesion.third(depth) for lesion, depth in lesions} == {0, 1, 2}


def test_answers_follow_from_the_rendered_voxels(train_volumes):
    """Count, presence, third and class recomputed from the mask and the voxels alone."""
    for volume in train_volumes:
        labels, found = ndimage.label(volume.mask, structure=np.ones((3, 3, 3)))
        assert found == len(volume.lesions), volume.volume_id
        assert answer_for("count", volume.lesions, volume.depth) == str(found)
        assert answer_for("presence", volume.lesions, volume.depth) == ("yes" if found else "no")
        side = volume.data.shape[1]
        components = []
        for component in range(1, found + 1):
            voxels = labels == component
            centre = int(np.argmax(voxels.sum(axis=(1, 2))))
            ys, xs = np.nonzero(voxels[centre])
            components.append((centre, (ys.mean() + 0.5) / side, (xs.mean() + 0.5) / side,
                               float(np.median(volume.data[voxels]))))
        for lesion in volume.lesions:
            # the component whose widest slice and in-plane centroid are the lesion's
            matches = [c for c in components if c[0] == lesion.z and abs(c[1] - lesion.y) < 0.05
                       and abs(c[2] - lesion.x) < 0.05]
            assert len(matches) == 1, (volume.volume_id, lesion)
            median = matches[0][3]
            component = labels == components.index(matches[0]) + 1
            assert (volume.labels[component] == 1 + LESION_CLASSES.index(lesion.cls)).all()
            # classes by their median voxel: cysts dark, calcifications brightest, the rest between
            if lesion.cls == "cyst":
                assert median < 0.3
            elif lesion.cls == "calcification":
                assert median > 0.85
            elif lesion.cls in ("mass", "nodule"):
                assert 0.55 < median < 0.95
        if found == 1:
            third = min(2, 3 * components[0][0] // volume.depth)
            assert answer_for("third", volume.lesions, volume.depth) == "ABC"[third]
        else:
            assert answer_for("third", volume.lesions, volume.depth) is None


def test_questions_match_metadata(train_volumes):
    seen = Counter()
    for volume in train_volumes:
        samples = questions_for(volume)
        categories = [s.category for s in samples]
        assert categories[:1] == ["presence"] and "count" in categories
        classes = {lesion.cls for lesion in volume.lesions}
        assert ("class" in categories) == (len(classes) == 1)
        assert ("third" in categories) == (len(volume.lesions) == 1)
        for sample in samples:
            seen[sample.category] += 1
            assert sample.volume is volume
            assert sample.answer == answer_for(sample.category, volume.lesions, volume.depth)
            if sample.options:
                assert sample.answer in sample.options
                assert sample.answer_text == sample.options[sample.answer]
                for letter, text in sample.options.items():
                    assert f"\n{letter}. {text}\n" in sample.question + "\n"
            if sample.category == "class":
                assert sample.answer_text == sample.lesion_class == classes.pop()
        assert len({s.sample_id for s in samples}) == len(samples)
    assert set(seen) == set(QUESTION_TYPES)


def test_answers_differ_in_their_first_character(train_volumes):
    """The checkpoint is scored on its first answer token: the possible answers of a question (its
    option letters, yes/no, the counts 0-3) never share their first character."""
    open_answers = {"presence": {"yes", "no"}, "count": {"0", "1", "2", "3"}}
    for volume in train_volumes:
        for sample in questions_for(volume):
            possible = set(sample.options) if sample.options else open_answers[sample.category]
            assert sample.answer in possible
            assert len({answer[0] for answer in possible}) == len(possible)


def test_default_test_split_has_500_questions():
    samples = generate_split("test", 200)
    assert len(samples) >= 500
    counts = Counter(s.category for s in samples)
    assert counts["presence"] == counts["count"] == 200
    assert counts["class"] >= 60 and counts["third"] >= 50
    assert {s.lesion_class for s in samples if s.category == "class"} == set(LESION_CLASSES)


def test_generate_split_is_a_union_of_volumes():
    samples = generate_split("val", 3, start=5)
    assert {s.volume.volume_id for s in samples} == {f"val-{i:05d}" for i in (5, 6, 7)}
    assert [s.sample_id for s in samples] == [
        s.sample_id for i in (5, 6, 7) for s in questions_for(generate_volume("val", i))
    ]


@pytest.mark.parametrize("category", ["type", "class"])
def test_write_jsonl_round_trip(tmp_path, category):
    samples = generate_split("test", 6)
    path = write_jsonl(samples, tmp_path, category=category)
    dataset = read_dataset(path, "jsonl", on_error="raise")
    assert len(dataset) == len(samples)
    assert len(list((tmp_path / "volumes").glob("*.npy"))) == 6
    for sample, row in zip(samples, dataset, strict=True):
        assert row.sample_id == sample.sample_id
        assert row.question == sample.question
        assert row.category == (sample.category if category == "type" else sample.lesion_class)
        assert row.options == sample.options
        if sample.options:
            assert row.answer_letter == sample.answer and row.answer == sample.answer_text
        else:
            assert row.answer_letter is None and row.answer == sample.answer
        # unit_range: read as stored, whatever the window (the checkpoint saw these exact intensities)
        np.testing.assert_array_equal(row.load(), sample.volume.data)
        np.testing.assert_array_equal(row.load(window=IDENTITY_WINDOW), sample.volume.data)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["question_type"] == samples[0].category


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: generate_volume("training", 0), "split"),
        (lambda: generate_volume("train", -1), "index"),
        (lambda: generate_volume("train", 1.0), "index"),
        (lambda: generate_split("test", -2), "num_volumes"),
        (lambda: answer_for("size", (), 16), "category"),
        (lambda: write_jsonl([], "unused", category="lesion"), "category"),
    ],
)
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_demo_volume_has_lesions_in_two_thirds():
    volume = demo_volume()
    assert volume.split == "test"
    assert len({lesion.third(volume.depth) for lesion in volume.lesions}) >= 2
    assert volume.mask.any(axis=(1, 2)).sum() >= 2


@pytest.mark.parametrize("per_side", [2, 3, 4])
def test_token_mask_against_a_loop_reference(train_volumes, per_side):
    """A token is marked when any voxel of its block is a lesion voxel (blocks as adaptive pooling cuts
    them: rows floor(i*H/n) .. ceil((i+1)*H/n))."""
    volume = next(v for v in train_volumes if len(v.lesions) >= 2)
    got = volume.token_mask(per_side)
    side = volume.data.shape[1]
    expected = np.zeros((volume.depth, per_side * per_side), dtype=bool)
    for s in range(volume.depth):
        for i in range(per_side):
            for j in range(per_side):
                rows = slice(i * side // per_side, -(-(i + 1) * side // per_side))
                cols = slice(j * side // per_side, -(-(j + 1) * side // per_side))
                expected[s, i * per_side + j] = volume.mask[s, rows, cols].any()
    np.testing.assert_array_equal(got, expected)
    assert got.any() and not got.all()


# ----------------------------------------------------------------------------------------- task v2
# medpruner.synthetic.ct: CT-like slabs for a model with 16 visual tokens per slice.

V2_VOLUMES = 160


@pytest.fixture(scope="module")
def v2_volumes():
    return [ct.generate_volume("val", i) for i in range(V2_VOLUMES)]


def _model_slices(volume) -> np.ndarray:
    """The volume at the model's resolution on the paper's [-1, 1] scale (what IAF compares)."""
    import torch

    slices = torch.nn.functional.interpolate(torch.from_numpy(volume.data)[:, None],
                                             size=(ct.MODEL_RESOLUTION, ct.MODEL_RESOLUTION), mode="bilinear",
                                             align_corners=False, antialias=True)[:, 0].clamp(0, 1)
    return (slices * 2 - 1).numpy()


def test_task_module_picks_the_version():
    from medpruner.synthetic import task

    assert task_module(1) is task and task_module(2) is ct
    with pytest.raises(ValueError, match="version"):
        task_module(3)


def test_v2_has_16_tokens_per_slice_at_the_model_resolution():
    """Through the real processor at the task's resolution: 8 x 8 patches of 8 pixels, merged 2 x 2."""
    from medpruner import _tiny
    from medpruner.pipeline import volume_to_inputs
    from transformers import Qwen3VLProcessor

    image_processor = _tiny.qwen_image_processor(ct.MODEL_PATCH, max_merged_patches=64)
    processor = _tiny.image_only_processor(Qwen3VLProcessor, image_processor, _tiny.qwen_tokenizer("left"))
    volume = ct.generate_volume("test", 0)
    inputs = volume_to_inputs(processor, volume.data, "Q?", family="qwen3_vl", resolution=ct.MODEL_RESOLUTION)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = int((inputs["input_ids"] == pad).sum())
    assert tokens == volume.depth * ct.TOKENS_PER_SLICE
    assert ct.TOKENS_PER_SLICE >= 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]] * volume.depth


@pytest.mark.parametrize("split", sorted(ct.SPLITS))
def test_v2_volume_is_deterministic(split):
    first, second = ct.generate_volume(split, 3), ct.generate_volume(split, 3)
    np.testing.assert_array_equal(first.data, second.data)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert (first.lesions, first.calcifications, first.organs, first.thickness_mm) == (
        second.lesions, second.calcifications, second.organs, second.thickness_mm)
    assert [(s.question, s.answer) for s in ct.questions_for(first)] == [
        (s.question, s.answer) for s in ct.questions_for(second)]


def test_v2_splits_are_disjoint():
    digests = {split: {_digest(ct.generate_volume(split, i)) for i in range(8)} for split in ct.SPLITS}
    for split in ct.SPLITS:
        assert len(digests[split]) == 8
        for other in ct.SPLITS:
            if other != split:
                assert not digests[split] & digests[other]


def test_v2_volume_ranges(v2_volumes):
    depths = [v.depth for v in v2_volumes]
    assert ct.DEPTH_RANGE[0] <= min(depths) and max(depths) <= ct.DEPTH_RANGE[1]
    assert {v.data.shape[1] for v in v2_volumes} == set(ct.SIDES)
    assert {v.thickness_mm for v in v2_volumes} == set(ct.THICKNESSES_MM)
    for volume in v2_volumes:
        assert volume.data.dtype == np.float32 and volume.data.min() >= 0 and volume.data.max() <= 1
        assert volume.labels.shape == volume.data.shape
    assert Counter(len(v.lesions) for v in v2_volumes).keys() == {0, 1, 2, 3}


def test_v2_lesions_span_1_to_10_and_more_slices(v2_volumes):
    extents = [lesion.extent for v in v2_volumes for lesion in v.lesions]
    assert min(extents) == 1 and max(extents) >= 15
    assert np.mean([e <= 2 for e in extents]) >= 0.05
    assert np.mean([e >= 10 for e in extents]) >= 0.15
    # thicker slices, fewer slices for the same lesion: the extent in mm stays physical
    for volume in v2_volumes:
        for lesion in volume.lesions:
            assert lesion.extent <= 2 * lesion.half_length_mm / volume.thickness_mm + 1


def test_v2_lesion_classes_are_long_tailed(v2_volumes):
    drawn = Counter(lesion.cls for v in v2_volumes for lesion in v.lesions)
    total = sum(drawn.values())
    assert total >= 150
    for cls, frequency in zip(ct.LESION_CLASSES, ct.CLASS_FREQUENCIES, strict=True):
        assert abs(drawn[cls] / total - frequency) < 4 * np.sqrt(frequency * (1 - frequency) / total), cls
    assert drawn["cyst"] > drawn["nodule"] > drawn["mass"]
    assert drawn["ring"] + drawn["lipoma"] < drawn["cyst"] / 2
    assert list(ct.CLASS_FREQUENCIES) == sorted(ct.CLASS_FREQUENCIES, reverse=True)


def test_v2_organs_appear_and_vanish_along_the_slice_axis(v2_volumes):
    """Most slabs hold an organ that starts or ends inside them, every organ does so somewhere, and
    the organ's recorded span is where its intensity is in the slices."""
    inside = [v for v in v2_volumes if any(o.first > 0 or o.last < v.depth - 1 for o in v.organs)]
    assert len(inside) >= 0.9 * len(v2_volumes)
    appear = {o.name for v in v2_volumes for o in v.organs if o.first > 0}
    vanish = {o.name for v in v2_volumes for o in v.organs if o.last < v.depth - 1}
    named = {o.name for v in v2_volumes for o in v.organs}
    assert named >= {"liver", "spleen", "kidney", "stomach", "bowel", "bladder"}
    assert appear >= named - {"liver"} and vanish >= named - {"bladder"}
    sets = [frozenset(o.name for o in v.organs if o.first <= s <= o.last) for v in v2_volumes for s in (0, v.depth - 1)]
    assert len(set(sets)) >= 10


def test_v2_slice_change_grows_with_thickness(v2_volumes):
    """Thin slices nearly repeat, thick ones jump: the median mean absolute difference of consecutive
    slices (model resolution, [-1, 1]) per thickness rises from 1 mm to 5 mm, and so does the
    fraction of slices IAF keeps at the paper's gamma."""
    import torch

    from medpruner_kernels import reference

    change, keep = {}, {}
    for volume in v2_volumes:
        slices = _model_slices(volume)
        change.setdefault(volume.thickness_mm, []).append(np.median(np.abs(np.diff(slices, axis=0)).mean((1, 2))))
        volume_slices = torch.from_numpy(slices).double().reshape(volume.depth, -1)
        kept = reference.iaf_select(volume_slices, 0.05, torch.tensor([0, volume.depth]))[0]
        keep.setdefault(volume.thickness_mm, []).append(float(kept.double().mean()))
    thin, thick = np.median(change[1.0] + change[1.25]), np.median(change[5.0])
    assert thick > 2 * thin
    assert np.mean(keep[5.0]) > 2 * np.mean(keep[1.0] + keep[1.25])


def test_v2_slice_change_is_of_real_anatomy_size(v2_volumes):
    """Against real anatomy, the only 1 mm volume bundled (nilearn's MNI152 T1 template, 1 mm): slabs
    of 1/2/3/5 mm averaged from it give consecutive-slice differences within a factor of 1.7 of the
    synthetic volumes of that thickness (both at the model's resolution)."""
    nilearn = pytest.importorskip("nilearn.datasets")
    import torch

    template = nilearn.load_mni152_template(resolution=1).get_fdata().astype(np.float32)
    template = np.transpose(template / template.max(), (2, 1, 0))[30:170]
    for thickness in (1.0, 2.0, 3.0, 5.0):
        t = int(thickness)
        slabs = template[: len(template) // t * t].reshape(-1, t, *template.shape[1:]).mean(1)
        real = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(slabs))[:, None], size=(64, 64),
                                               mode="bilinear", align_corners=False, antialias=True)[:, 0] * 2 - 1
        real_change = float((real[1:] - real[:-1]).abs().mean((1, 2)).median())
        synthetic = np.median([np.median(np.abs(np.diff(_model_slices(v), axis=0)).mean((1, 2)))
                               for v in v2_volumes if v.thickness_mm == thickness])
        assert real_change / 1.7 < synthetic < real_change * 1.7, (thickness, synthetic, real_change)


def test_v2_findings_follow_from_the_rendered_voxels(v2_volumes):
    """Lesions and calcifications counted from the label voxels; each calcification is 1-2 slices and
    a few pixels at the model's resolution, and the brightest thing in its slice's soft tissue."""
    for volume in v2_volumes[:60]:
        lesion_voxels = (volume.labels > 0) & (volume.labels < ct.SMALL_FINDING_LABEL)
        _, found = ndimage.label(lesion_voxels, structure=np.ones((3, 3, 3)))
        assert found == len(volume.lesions), volume.volume_id
        for lesion in volume.lesions:
            rows = np.flatnonzero((volume.labels == 1 + ct.LESION_CLASSES.index(lesion.cls)).any(axis=(1, 2)))
            assert lesion.first >= rows.min() and lesion.last <= rows.max()
        components, spots = ndimage.label(volume.labels == ct.SMALL_FINDING_LABEL, structure=np.ones((3, 3, 3)))
        assert spots == len(volume.calcifications)
        scale = (ct.MODEL_RESOLUTION / volume.data.shape[1]) ** 2
        for spot in volume.calcifications:
            assert 1 <= spot.extent <= 2
            side = volume.data.shape[1]
            component = components[spot.first, int(spot.y * side), int(spot.x * side)]
            assert component > 0
            for s in spot.slices(volume.depth):
                voxels = components[s] == component
                assert 3 <= float(voxels.sum()) * scale <= 20, volume.volume_id
                assert volume.data[s][voxels].max() >= 0.95
        assert ct.answer_for("calcification", volume.lesions, volume.depth, volume.calcifications) == (
            "yes" if spots else "no")
        assert ct.answer_for("count", volume.lesions, volume.depth) == str(found)


def test_v2_questions(v2_volumes):
    seen = Counter()
    answers = Counter()
    for volume in v2_volumes:
        samples = ct.questions_for(volume)
        categories = [s.category for s in samples]
        assert {"presence", "count", "calcification"} <= set(categories)
        assert ("class" in categories) == (len({lesion.cls for lesion in volume.lesions}) == 1)
        assert ("third" in categories) == (len(volume.lesions) == 1)
        for sample in samples:
            seen[sample.category] += 1
            answers[sample.category, sample.answer] += 1
            if sample.category == "calcification":
                assert sample.lesion_class == ("calcification" if volume.calcifications else "none")
            possible = set(sample.options) if sample.options else {"yes", "no", "0", "1", "2", "3"}
            assert sample.answer in possible
            if sample.options:
                assert len({letter[0] for letter in sample.options}) == len(sample.options)
    assert set(seen) == set(ct.QUESTION_TYPES)
    # the small-finding question is balanced: its majority answer is not a free pass
    calcification = answers["calcification", "yes"] / seen["calcification"]
    assert 0.35 < calcification < 0.65


def test_v2_write_jsonl_round_trip(tmp_path):
    samples = ct.generate_split("test", 3)
    path = write_jsonl(samples, tmp_path)
    dataset = read_dataset(path, "jsonl", on_error="raise")
    assert [row.sample_id for row in dataset] == [s.sample_id for s in samples]
    assert {p.name for p in (tmp_path / "volumes").glob("*.npy")} == {f"test-v2-{i:05d}.npy" for i in range(3)}
    np.testing.assert_array_equal(next(iter(dataset)).load(), samples[0].volume.data)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: ct.generate_volume("training", 0), "split"),
        (lambda: ct.generate_volume("train", -1), "index"),
        (lambda: ct.generate_split("test", -2), "num_volumes"),
        (lambda: ct.answer_for("size", (), 16), "category"),
    ],
)
def test_v2_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_v2_demo_volume():
    volume = ct.demo_volume()
    assert volume.calcifications and len({lesion.third(volume.depth) for lesion in volume.lesions}) >= 2
