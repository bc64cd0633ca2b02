"""medpruner.volume: loaders on real files shipped with nibabel/pydicom (and files built from them),
geometry, CT windowing against hand-computed values, and the gamma scale conversion."""

from __future__ import annotations

import copy
import gzip
import importlib.util
import random
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from _dicom_files import pydicom_file, set_jpeg_lossless_pixels, write_jpeg_lossless_volume
from medpruner import volume as vol
from medpruner.volume import Volume, VolumeError, load_volume
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from medpruner_kernels import reference


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is a test dependency"
    return Path(next(iter(spec.submodule_search_locations)))


NIBABEL_DATA = _package_dir("nibabel") / "tests" / "data"
PYDICOM_DATA = _package_dir("pydicom") / "data" / "test_files"
EXAMPLE4D = NIBABEL_DATA / "example4d.nii.gz"
ANATOMICAL = NIBABEL_DATA / "anatomical.nii"
CT_SMALL = PYDICOM_DATA / "CT_small.dcm"
CT5N = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"
RTDOSE = PYDICOM_DATA / "rtdose.dcm"


def _pydicom_data_file(name: str) -> Path:
    # pydicom-data ships these offline; without it pydicom would try to download them.
    pytest.importorskip("data_store", reason="pydicom-data (offline DICOM test files) is not installed")
    return _package_dir("data_store") / "data" / name


def _world(affine, index):
    return (np.asarray(affine) @ np.append(np.asarray(index, dtype=np.float64), 1.0))[:3]


def _iaf_keep(slices: np.ndarray, gamma: float) -> np.ndarray:
    flat = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float64)).reshape(slices.shape[0], -1)
    keep, _ = reference.iaf_select(flat, gamma, torch.tensor([0, slices.shape[0]], dtype=torch.int32))
    return keep.numpy()


# -------------------------------------------------------------------------------------------- NIfTI
def test_nifti_4d_needs_a_frame_and_each_frame_matches_nibabel():
    with pytest.raises(VolumeError, match=r"example4d\.nii\.gz: 4D image with 2 frames"):
        load_volume(EXAMPLE4D)
    image = nib.load(EXAMPLE4D)
    stored = np.asarray(image.dataobj)
    for frame in (0, 1):
        v = load_volume(EXAMPLE4D, frame=frame)
        assert v.shape == (24, 96, 128)
        # The slice axis (k) comes first; the in-plane axes become (rows = j, columns = i).
        np.testing.assert_array_equal(v.data, np.transpose(stored[..., frame], (2, 1, 0)))
        assert v.slice_axis == 2 and "dim_info" in v.slice_axis_reason
    with pytest.raises(VolumeError, match="frame must be an int"):
        load_volume(EXAMPLE4D, frame=2)


def test_nifti_affine_follows_the_reslicing():
    image = nib.load(EXAMPLE4D)
    v = load_volume(EXAMPLE4D, frame=0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, h, w = (int(rng.integers(n)) for n in v.shape)
        np.testing.assert_allclose(_world(v.affine, (d, h, w)), _world(image.affine, (w, h, d)), atol=1e-9)
    np.testing.assert_allclose(v.spacing, nib.affines.voxel_sizes(image.affine)[[2, 1, 0]], rtol=1e-6)


def test_nifti_uncompressed_is_memory_mapped_and_axis_is_closest_to_z():
    v = load_volume(ANATOMICAL)
    assert isinstance(v.data, np.memmap)
    assert v.slice_axis == 2 and "closest to the scanner's z" in v.slice_axis_reason
    assert v.orientation == ("S", "A", "L")
    assert v.display_flips() == (True, False)
    assert v.modality == "MR"  # negative values (min -610) but no air at -1000
    stored = np.asarray(nib.load(ANATOMICAL).dataobj)
    np.testing.assert_array_equal(v.data, np.transpose(stored, (2, 1, 0)))
    sagittal = load_volume(ANATOMICAL, slice_axis=0)
    assert sagittal.shape == (33, 25, 41) and sagittal.slice_axis_reason == "given by the caller"
    np.testing.assert_array_equal(sagittal.data, np.transpose(stored, (0, 2, 1)))
    as_float = load_volume(ANATOMICAL, dtype=np.float32)
    assert as_float.data.dtype == np.float32


def test_nifti_oblique_affine_picks_the_axis_nearest_z(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    angle = np.deg2rad(20)
    # Voxel axis 0 runs mostly along z (tilted by 20 degrees), axis 2 along x, axis 1 along y.
    affine = np.array(
        [
            [0.0, 0.0, 1.5, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [3.0 * np.cos(angle), 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    affine[0, 0] = 3.0 * np.sin(angle)
    path = tmp_path / "oblique.nii"
    nib.save(nib.Nifti1Image(data, affine), path)
    v = load_volume(path)
    assert v.slice_axis == 0 and v.shape == (4, 6, 5)
    assert v.spacing == pytest.approx((3.0, 1.5, 1.0))
    # A recorded slice dimension wins over the geometry.
    header_path = tmp_path / "dim_info.nii"
    image = nib.Nifti1Image(data, affine)
    image.header.set_dim_info(slice=1)
    nib.save(image, header_path)
    assert load_volume(header_path).slice_axis == 1


def test_nifti_scaled_float64_becomes_float32(tmp_path):
    path = tmp_path / "scaled.nii.gz"
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    image.header.set_slope_inter(0.5, -10.0)
    nib.save(image, path)
    v = load_volume(path)
    assert v.data.dtype == np.float32
    np.testing.assert_allclose(v.data[:, 0, 0], np.array([0, 1, 2, 3]) * 0.5 - 10.0)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_nifti_gz_is_a_clear_error(tmp_path, cut):
    data = EXAMPLE4D.read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: cannot read") as info:
        load_volume(path, frame=1)
    assert isinstance(info.value, ValueError)


def test_truncated_uncompressed_nifti_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.nii"
    path.write_bytes(ANATOMICAL.read_bytes()[:1000])
    with pytest.raises(VolumeError, match=r"cut\.nii: truncated or corrupt: the header claims"):
        load_volume(path)


def test_empty_garbage_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.nii.gz"
    empty.touch()
    with pytest.raises(VolumeError, match=r"empty\.nii\.gz: file is empty"):
        load_volume(empty)
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(600)))
    with pytest.raises(VolumeError, match=r"garbage\.nii: cannot read"):
        load_volume(garbage)
    gz_garbage = tmp_path / "notgzip.nii.gz"
    gz_garbage.write_bytes(b"this is not gzip data at all" * 20)
    with pytest.raises(VolumeError, match=r"notgzip\.nii\.gz: cannot read"):
        load_volume(gz_garbage)
    with pytest.raises(VolumeError, match=r"missing\.nii: no such file"):
        load_volume(tmp_path / "missing.nii")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(VolumeError, match=r"notes\.txt: unsupported format '\.txt'"):
        load_volume(text)
    with pytest.raises(TypeError, match="source must be"):
        load_volume(12)


# -------------------------------------------------------------------------------------------- DICOM
def test_single_ct_slice_is_in_hounsfield_units():
    ds = pydicom.dcmread(CT_SMALL)
    v = load_volume(CT_SMALL)
    assert v.shape == (1, 128, 128) and v.modality == "CT" and v.data.dtype == np.float32
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(v.data[0], expected.astype(np.float32))
    assert v.spacing == pytest.approx((5.0, 0.661468, 0.661468))
    # LPS (-158.1, -179.0, -75.7) is RAS (158.1, 179.0, -75.7).
    np.testing.assert_allclose(_world(v.affine, (0, 0, 0)), [158.135803, 179.035797, -75.699997], atol=1e-5)


def test_real_ct_series_is_sorted_by_position():
    v = load_volume(CT5N)
    assert v.shape == (5, 16, 16) and v.modality == "CT"
    assert v.window_hint == (40.0, 400.0)
    assert v.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    by_z = {}
    for path in CT5N.iterdir():
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        by_z[float(ds.ImagePositionPatient[2])] = hu
    # The normal of ImageOrientationPatient (1,0,0)x(0,1,0) is +z: ascending z.
    for d, z in enumerate(sorted(by_z)):
        np.testing.assert_array_equal(v.data[d], by_z[z])
        assert _world(v.affine, (d, 0, 0))[2] == pytest.approx(z, abs=1e-4)


def _write_series(folder: Path, count: int, *, shuffle_seed=0, edit=None) -> list[float]:
    """A series built from CT_small.dcm: slice k gets pixels + 10 k and z = -75.7 + 2.5 k, written
    under shuffled file names. Returns the z of each file in write order."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(CT_SMALL)
    base_pixels = base.pixel_array.astype(np.int16)
    order = list(range(count))
    random.Random(shuffle_seed).shuffle(order)
    zs = []
    for name_index, k in enumerate(order):
        ds = copy.deepcopy(base)
        pixels = base_pixels + np.int16(10 * k)
        ds.PixelData = pixels.tobytes()
        z = -75.7 + 2.5 * k
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.InstanceNumber = count - k  # deliberately disagrees with the geometry
        ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{k + 1}"
        if edit is not None:
            edit(name_index, ds)
        ds.save_as(folder / f"IM{name_index:04d}")
        zs.append(z)
    return zs


def test_built_series_with_shuffled_files_is_ordered_by_image_position(tmp_path):
    _write_series(tmp_path / "series", 6)
    (tmp_path / "series" / "README.txt").write_text("not a slice")
    v = load_volume(tmp_path / "series")
    base = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float32) - 1024.0
    assert v.shape == (6, 128, 128)
    for k in range(6):
        np.testing.assert_array_equal(v.data[k], base + 10 * k)
    assert v.spacing[0] == pytest.approx(2.5)


def test_mixed_series_are_rejected(tmp_path):
    def other_series(index, ds):
        if index == 2:
            ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"

    _write_series(tmp_path / "uids", 4, edit=other_series)
    with pytest.raises(VolumeError, match=r"uids: mixes 2 series"):
        load_volume(tmp_path / "uids")

    def tilted(index, ds):
        if index == 1:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]

    _write_series(tmp_path / "orient", 4, edit=tilted)
    with pytest.raises(VolumeError, match="different orientations"):
        load_volume(tmp_path / "orient")

    def resized(index, ds):
        if index == 3:
            ds.Rows = 64

    _write_series(tmp_path / "sizes", 4, edit=resized)
    with pytest.raises(VolumeError, match="slices of different sizes"):
        load_volume(tmp_path / "sizes")

    def same_place(index, ds):
        ds.ImagePositionPatient = [0.0, 0.0, 1.0 if index < 2 else float(index)]

    _write_series(tmp_path / "dupes", 4, edit=same_place)
    with pytest.raises(VolumeError, match="lie at the same slice position"):
        load_volume(tmp_path / "dupes")


def test_corrupt_slice_in_a_series_names_the_file(tmp_path):
    _write_series(tmp_path / "series", 3)
    victim = tmp_path / "series" / "IM0001"
    victim.write_bytes(victim.read_bytes()[:-5000])
    with pytest.raises(VolumeError, match=r"IM0001: cannot read DICOM pixel data"):
        load_volume(tmp_path / "series")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.txt").write_text("x")
    with pytest.raises(VolumeError, match="no DICOM files in this folder"):
        load_volume(tmp_path / "none")


def test_multiframe_dose_grid_uses_frame_offsets_and_scaling():
    ds = pydicom.dcmread(RTDOSE)
    v = load_volume(RTDOSE)
    assert v.shape == (15, 10, 10)
    offsets = np.asarray(ds.GridFrameOffsetVector, dtype=np.float64)
    order = np.argsort(offsets)
    expected = ds.pixel_array[order].astype(np.float64) * float(ds.DoseGridScaling)
    np.testing.assert_allclose(v.data, expected, rtol=1e-6)
    assert v.spacing[0] == pytest.approx(float(np.median(np.diff(offsets[order]))))


def test_enhanced_multiframe_ct_uses_per_frame_positions_and_rescale():
    path = _pydicom_data_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    v = load_volume(path)
    assert v.shape == (2, 512, 512) and v.modality == "CT" and v.window_hint == (49.0, 102.0)
    raw = ds.pixel_array.astype(np.float32)
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence]
    # Orientation (-1,0,0)x(0,1,0): the normal is -z, so the higher slice comes first.
    first = int(np.argmax([float(p[2]) for p in positions]))
    np.testing.assert_array_equal(v.data[0], raw[first] - 1024.0)
    np.testing.assert_array_equal(v.data[1], raw[1 - first] - 1024.0)


def test_enhanced_mr_without_positions_keeps_file_order():
    path = _pydicom_data_file("emri_small.dcm")
    v = load_volume(path)
    assert v.shape == (10, 64, 64) and v.modality == "MR"
    np.testing.assert_array_equal(v.data, pydicom.dcmread(path).pixel_array)
    assert any("file order" in note for note in v.notes)


def test_truncated_and_fake_dicom_files(tmp_path):
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(CT_SMALL.read_bytes()[:20000])
    with pytest.raises(VolumeError, match=r"cut\.dcm: cannot read DICOM pixel data"):
        load_volume(cut)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\x00" * 128 + b"NOPE" + b"\x01" * 64)
    with pytest.raises(VolumeError, match=r"fake\.dcm: "):
        load_volume(fake)
    truncated_header = tmp_path / "MR_truncated.dcm"
    shutil.copy(PYDICOM_DATA / "MR_truncated.dcm", truncated_header)
    with pytest.raises(VolumeError, match=r"MR_truncated\.dcm: cannot read"):
        load_volume(truncated_header)


# -------------------------------------------------------------------------------- compressed DICOM
def _stored_pixels(ds) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype=np.int16).reshape(ds.Rows, ds.Columns)


def _jpeg_lossless(index, ds):
    set_jpeg_lossless_pixels(ds, _stored_pixels(ds))


def _jpeg2000_lossless(index, ds):
    ds.compress(JPEG2000Lossless, _stored_pixels(ds))


@pytest.mark.parametrize(
    "encode", [_jpeg_lossless, _jpeg2000_lossless], ids=["jpeg-lossless-process14", "jpeg2000-lossless"]
)
def test_compressed_series_decode_to_the_uncompressed_volume(tmp_path, encode):
    _write_series(tmp_path / "plain", 5)
    _write_series(tmp_path / "packed", 5, edit=encode)
    plain, packed = load_volume(tmp_path / "plain"), load_volume(tmp_path / "packed")
    np.testing.assert_array_equal(packed.data, plain.data)
    np.testing.assert_array_equal(packed.affine, plain.affine)
    assert packed.modality == "CT" and packed.window_hint == plain.window_hint
    base = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float32) - 1024.0
    for k in range(5):
        np.testing.assert_array_equal(packed.data[k], base + 10 * k)


def test_jpeg_lossless_multiframe_holds_any_int16_exactly(tmp_path):
    rng = np.random.default_rng(11)
    frames = np.stack(
        [
            # Every difference category, and coded bytes of 0xFF that the encoder must stuff.
            rng.integers(-32768, 32768, size=(24, 20)),
            np.full((24, 20), -32768),
            np.full((24, 20), 32767),
            np.tile(np.arange(20) * 1500 - 14000, (24, 1)),
        ]
    ).astype(np.int16)
    path = write_jpeg_lossless_volume(tmp_path / "frames.dcm", CT_SMALL, frames)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    v = load_volume(path)
    assert v.shape == (4, 24, 20) and v.data.dtype == np.float32
    # CT_small's rescale (slope 1, intercept -1024) applies to every frame.
    np.testing.assert_array_equal(v.data, frames.astype(np.float32) - 1024.0)


@pytest.mark.parametrize(
    "compressed, plain",
    [
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_jpeg2000_files_decode_like_their_uncompressed_twins(compressed, plain):
    packed, reference = load_volume(pydicom_file(compressed)), load_volume(pydicom_file(plain))
    assert packed.shape == reference.shape
    np.testing.assert_array_equal(packed.data, reference.data)
    np.testing.assert_array_equal(packed.affine, reference.affine)
    assert packed.modality == reference.modality


def test_jpeg_lossless_file_from_pydicom_data_loads():
    path = pydicom_file("JPEG-LL.dcm")
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    v = load_volume(path)
    assert v.shape == (1, 1024, 256) and v.modality == "NM" and v.data.dtype == np.int16
    np.testing.assert_array_equal(v.data[0], ds.pixel_array)


# --------------------------------------------------------------------------------------------- NRRD
def test_nrrd_geometry_converts_lps_to_ras(tmp_path):
    data = np.random.default_rng(1).integers(-1024, 2000, size=(7, 6, 5)).astype(np.int16)
    directions = np.array([[0.8, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 2.0]])
    path = tmp_path / "ct.nrrd"
    nrrd.write(
        str(path),
        data,
        {
            "space": "left-posterior-superior",
            "space directions": directions,
            "space origin": np.array([10.0, 20.0, 30.0]),
        },
    )
    v = load_volume(path)
    assert v.slice_axis == 2 and v.shape == (5, 6, 7)
    np.testing.assert_array_equal(v.data, np.transpose(data, (2, 1, 0)))
    assert v.spacing == pytest.approx((2.0, 0.9, 0.8))
    np.testing.assert_allclose(_world(v.affine, (1, 2, 3)), [-(10 + 0.8 * 3), -(20 + 0.9 * 2), 30 + 2.0 * 1])
    assert v.modality == "CT"


def test_nrrd_without_geometry_and_truncated(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    path = tmp_path / "plain.nrrd"
    nrrd.write(str(path), data, {"encoding": "raw"})
    v = load_volume(path)
    assert v.slice_axis == 2 and "no space directions" in v.slice_axis_reason
    np.testing.assert_array_equal(v.data, np.transpose(data, (2, 1, 0)))
    cut = tmp_path / "cut.nrrd"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(VolumeError, match=r"cut\.nrrd: cannot read NRRD"):
        load_volume(cut)


# ---------------------------------------------------------------------------------- numpy and torch
def test_arrays_tensors_npy_and_npz(tmp_path):
    data = np.random.default_rng(2).random((4, 8, 9)).astype(np.float32)
    v = load_volume(data, spacing=(3.0, 0.5, 0.5))
    assert v.shape == (4, 8, 9) and v.spacing == (3.0, 0.5, 0.5) and v.source is None
    assert load_volume(data, slice_axis=2).shape == (9, 4, 8)
    assert load_volume(data[0]).shape == (1, 8, 9)
    t = load_volume(torch.from_numpy(data).to(torch.bfloat16))
    assert t.data.dtype == np.float32 and t.shape == (4, 8, 9)
    with pytest.raises(VolumeError, match=r"must be \[D, H, W\]"):
        load_volume(np.zeros((2, 2, 2, 2)))
    with pytest.raises(VolumeError, match="spacing must be three positive numbers"):
        load_volume(data, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(VolumeError, match="volume is empty"):
        load_volume(np.zeros((0, 4, 4)))

    npy = tmp_path / "v.npy"
    np.save(npy, data)
    loaded = load_volume(npy)
    assert isinstance(loaded.data, np.memmap)
    np.testing.assert_array_equal(loaded.data, data)
    npz = tmp_path / "v.npz"
    np.savez(npz, volume=data, labels=data > 0.5)
    np.testing.assert_array_equal(load_volume(npz).data, data)
    np.testing.assert_array_equal(load_volume(npz, key="labels").data, (data > 0.5).astype(np.float32))
    ambiguous = tmp_path / "two.npz"
    np.savez(ambiguous, a=data, b=data)
    with pytest.raises(VolumeError, match=r"two\.npz: holds several arrays"):
        load_volume(ambiguous)
    broken = tmp_path / "broken.npy"
    broken.write_bytes(npy.read_bytes()[:200])
    with pytest.raises(VolumeError, match=r"broken\.npy: cannot read numpy data"):
        load_volume(broken)


def test_modality_guess():
    air = np.full((2, 10, 10), -1000, dtype=np.int16)
    air[:, 3:7, 3:7] = 40
    assert load_volume(air).modality == "CT"
    assert load_volume(np.abs(air)).modality == "MR"
    assert load_volume(air, modality="MR").modality == "MR"


# -------------------------------------------------------------------------------------- intensities
def test_ct_presets_are_the_standard_windows():
    assert vol.CT_WINDOWS == {
        "abdomen": (40.0, 400.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
        "brain": (40.0, 80.0),
        "mediastinum": (50.0, 350.0),
    }


@pytest.mark.parametrize(
    "name, hu, expected",
    [
        # abdomen: level 40, width 400 -> [-160, 240]
        ("abdomen", [-1000, -160, 40, 140, 240, 3000], [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]),
        # lung: level -600, width 1500 -> [-1350, 150]
        ("lung", [-1350, -1000, -600, 0, 150], [0.0, 350 / 1500, 0.5, 0.9, 1.0]),
        # bone: level 400, width 1800 -> [-500, 1300]
        ("bone", [-500, 0, 400, 850, 1300], [0.0, 500 / 1800, 0.5, 0.75, 1.0]),
        # brain: level 40, width 80 -> [0, 80]
        ("brain", [-5, 0, 20, 40, 80, 100], [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]),
        # mediastinum: level 50, width 350 -> [-125, 225]
        ("mediastinum", [-125, 50, 120, 225], [0.0, 0.5, 0.7, 1.0]),
        ("-100,200", [-200, -150, -100, 0], [0.0, 0.25, 0.5, 1.0]),
    ],
)
def test_ct_windowing_matches_hand_computed_values(name, hu, expected):
    window = vol.resolve_window(name)
    out = vol.apply_window(np.asarray(hu, dtype=np.int16), window)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_window_specs_and_errors():
    assert vol.resolve_window((40, 400)) == vol.resolve_window("abdomen").__class__(
        "ct", "40,400", 40.0, 400.0
    )
    assert vol.resolve_window(" Lung ").name == "lung"
    for bad in ("soft", "40", "a,b", "40,-5"):
        with pytest.raises(ValueError, match="window"):
            vol.resolve_window(bad)
    with pytest.raises(TypeError):
        vol.resolve_window(3.5)
    nan_hu = np.array([np.nan, 40.0], dtype=np.float32)
    np.testing.assert_array_equal(vol.window_ct(nan_hu, 40, 400), [0.0, 0.5])


def test_auto_window_follows_the_modality():
    ct_series = load_volume(CT5N)
    assert vol.resolve_window("auto", ct_series).describe() == {
        "kind": "ct",
        "name": "dicom",
        "level": 40.0,
        "width": 400.0,
    }
    ct_array = load_volume(np.full((1, 4, 4), -1000.0))
    assert vol.resolve_window("auto", ct_array).name == "abdomen"
    mr = load_volume(ANATOMICAL)
    assert vol.resolve_window("auto", mr).kind == "percentile"
    slices, window = vol.normalize(mr)
    assert window.kind == "percentile" and slices.dtype == np.float32
    assert slices.min() == 0.0 and slices.max() == 1.0


def test_percentile_scaling():
    values = np.arange(1001, dtype=np.float64)  # percentiles: 0.5 -> 5, 99.5 -> 995
    out = vol.scale_percentile(values)
    assert out[5] == 0.0 and out[995] == 1.0
    assert out[500] == pytest.approx(0.5)
    assert out[0] == 0.0 and out[1000] == 1.0
    np.testing.assert_array_equal(vol.scale_percentile(np.full((3, 3), 7.0)), np.zeros((3, 3)))
    with_nan = vol.scale_percentile(np.array([0.0, np.nan, 10.0]), 0, 100)
    np.testing.assert_array_equal(with_nan, [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="low < high"):
        vol.scale_percentile(values, 60, 40)


def test_gamma_conversion_gives_the_same_decisions_on_both_scales():
    assert vol.gamma_for_unit_range(0.05) == 0.025
    with pytest.raises(ValueError, match="gamma"):
        vol.gamma_for_unit_range(float("nan"))
    with pytest.raises(ValueError, match="gamma"):
        vol.gamma_for_unit_range("0.05")
    unit, _ = vol.normalize(load_volume(EXAMPLE4D, frame=0))
    signed = vol.to_model_range(unit)
    assert signed.min() == -1.0 and signed.max() == 1.0
    np.testing.assert_allclose(vol.from_model_range(signed), unit, atol=1e-7)
    for gamma in (0.02, 0.05, 0.1):
        keep_signed = _iaf_keep(signed, gamma)
        np.testing.assert_array_equal(_iaf_keep(unit, vol.gamma_for_unit_range(gamma)), keep_signed)
        assert 1 <= keep_signed.sum() <= unit.shape[0]


def test_describe_is_json_ready():
    import json

    described = load_volume(CT5N).describe()
    assert json.loads(json.dumps(described))["shape"] == [5, 16, 16]
    assert isinstance(load_volume(CT5N), Volume)


def test_gzip_member_with_a_valid_header_but_short_data(tmp_path):
    raw = gzip.decompress(EXAMPLE4D.read_bytes())
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw[: len(raw) // 3]))
    with pytest.raises(VolumeError, match=r"short\.nii\.gz: cannot read the voxel data"):
        load_volume(path, frame=0)


def test_nilearn_mni_template_loads_offline_along_its_axial_axis():
    path = _package_dir("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    v = load_volume(path)
    image = nib.load(path)
    assert v.shape == (189, 233, 197) and v.data.dtype == np.uint8 and v.modality == "MR"
    assert v.slice_axis == 2 and v.orientation[0] == "S" and v.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(v.data[94], np.asarray(image.dataobj)[:, :, 94].T)
    slices, window = vol.normalize(v)
    assert window.kind == "percentile" and slices.dtype == np.float32
    assert slices.min() == 0.0 and slices.max() == 1.0


# ------------------------------------------------------------------------------------ issue 25
def _claiming(path: Path, shape, data_bytes: bytes) -> Path:
    header = nib.Nifti1Header()
    header["magic"] = b"n+1"
    header.set_data_offset(352)
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    raw = header.binaryblock + b"\0" * 4 + data_bytes
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_a_header_claiming_more_voxels_than_the_file_can_hold_is_refused(tmp_path, name):
    path = _claiming(tmp_path / name, (30000, 30000, 30000), bytes(256))
    with pytest.raises(VolumeError, match=rf"{name.replace('.', '[.]')}: .*\(108,000,000,000,[0-9]{{3}} bytes\)"):
        load_volume(path)


def test_the_claimed_size_check_passes_exact_files_and_refuses_one_byte_short(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32)
    exact = _claiming(tmp_path / "exact.nii", (4, 5, 6), data.tobytes())
    assert load_volume(exact).shape == (6, 5, 4)
    short = _claiming(tmp_path / "short.nii", (4, 5, 6), data.tobytes()[:-1])
    with pytest.raises(VolumeError, match=r"short\.nii: truncated or corrupt: .* \(832 bytes\), the file holds 831"):
        load_volume(short)
    packed = _claiming(tmp_path / "ok.nii.gz", (4, 5, 6), data.tobytes())
    np.testing.assert_array_equal(load_volume(packed).data, load_volume(exact).data)
    np.testing.assert_array_equal(np.asarray(nib.load(packed).dataobj), data.reshape((4, 5, 6), order="F"))


def test_the_claimed_size_check_refuses_what_memory_cannot_hold(tmp_path, monkeypatch):
    from medpruner.volume import nifti

    path = _claiming(tmp_path / "v.nii", (4, 5, 6), bytes(480))
    monkeypatch.setattr(nifti, "available_memory", lambda: 100)
    with pytest.raises(VolumeError, match=r"v\.nii: the volume needs 480 bytes, more than the 100 bytes"):
        load_volume(path)


def test_nonfinite_voxels_are_replaced_by_the_policy_and_counted(tmp_path):
    data = np.linspace(-5, 20, 3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    data[0, 0, 0], data[1, 1, 1], data[2, 2, 2], data[2, 3, 3] = np.nan, np.inf, -np.inf, np.nan
    finite = data[np.isfinite(data)]
    low_side = np.isnan(data) | np.isneginf(data)
    expected = np.where(low_side, finite.min(), np.where(np.isposinf(data), finite.max(), data))
    volume = load_volume(data)
    slices, window = vol.normalize(volume, "percentile")
    np.testing.assert_array_equal(slices, vol.normalize(load_volume(expected), "percentile")[0])
    assert volume.nonfinite == {
        "nan": 2, "posinf": 1, "neginf": 1, "voxels": 48, "policy": vol.NONFINITE_POLICY,
        "finite_min": float(finite.min()), "finite_max": float(finite.max()),
    }
    assert volume.describe()["nonfinite"] == volume.nonfinite and volume.constant_value is None
    clean = load_volume(expected)
    vol.normalize(clean)
    assert clean.nonfinite is None


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
def test_a_volume_without_a_finite_voxel_is_refused(tmp_path, fill):
    path = tmp_path / "empty.npy"
    np.save(path, np.full((2, 3, 3), fill, dtype=np.float32))
    with pytest.raises(VolumeError, match=r"empty\.npy: no finite voxel value: all 18 voxels are NaN or Inf"):
        vol.normalize(load_volume(path))


def test_a_constant_volume_is_recorded_not_refused():
    volume = load_volume(np.full((3, 4, 4), 2, dtype=np.int16))
    slices, _ = vol.normalize(volume)
    assert volume.constant_value == 2.0 and volume.describe()["constant"] is True
    assert not slices.any()


def test_an_inf_slice_does_not_make_a_volume_ct():
    data = np.random.default_rng(0).random((6, 8, 8)).astype(np.float32) * 300
    assert load_volume(data).modality == "MR"
    data[2] = -np.inf
    assert load_volume(data).modality == "MR"
    data[3] = -1000.0
    assert load_volume(data).modality == "CT"


def test_guessed_metadata_is_listed_as_assumed(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 3), np.float32))
    assert load_volume(tmp_path / "a.npy").assumed == ["modality", "spacing", "orientation"]
    assert load_volume(np.zeros((2, 3, 3)), spacing=(2, 1, 1)).assumed == ["modality"]
    assert load_volume(np.zeros((2, 3, 3)), spacing=(2, 1, 1), modality="CT").assumed == []
    assert load_volume(ANATOMICAL).assumed == ["modality"]
    assert load_volume(CT5N).assumed == []


def test_a_pickled_npy_is_refused_without_numpy_advice(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad in (path, tmp_path / "text.npy"):
        if bad.name == "text.npy":
            bad.write_bytes(b"plain text, not numpy")
        with pytest.raises(VolumeError) as info:
            load_volume(bad)
        assert str(info.value) == f"{bad}: not a numeric array: the file holds Python objects (pickled data), " \
            "which are never loaded"
        assert "allow_pickle" not in str(info.value)


def test_the_unit_window_keeps_unit_values():
    data = np.array([[[-0.5, 0.0], [0.25, 1.5]]], dtype=np.float32)
    slices, window = vol.normalize(load_volume(data), "unit")
    assert window.describe() == {"kind": "unit", "name": "unit"}
    np.testing.assert_array_equal(slices, [[[0.0, 0.0], [0.25, 1.0]]])
