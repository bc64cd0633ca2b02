"""The synthetic 3D VQA generator: determinism, disjoint splits, the drawn volumes against the issue's
ranges, answers recomputed from the rendered voxels, and the JSONL round trip through the eval reader."""

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
    demo_volume,
    generate_split,
    generate_volume,
    questions_for,
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
