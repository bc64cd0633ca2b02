"""Compressed DICOM files built by the tests: a JPEG Lossless encoder written from the standard, so a
decoder's output can be compared with pixels the test chose (pydicom cannot write Process 14)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1


def pydicom_file(name: str) -> Path:
    """A file of pydicom's test data, found offline: pydicom ships some, pydicom-data the rest (without
    it, pydicom would try to download them)."""
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.importorskip("data_store", reason="pydicom-data (offline DICOM test files) is not installed")
    assert found is not None, f"{name}: in neither pydicom's test files nor pydicom-data"
    return Path(found)


def jpeg_lossless_sv1(pixels: np.ndarray) -> bytes:
    """One 16-bit frame as a JPEG Lossless codestream (ITU T.81 Annex H: Process 14, first-order
    prediction (selection value 1), no point transform). Every difference category 0..16 gets a 5-bit
    Huffman code, so the table is one line; byte stuffing and the final 1-bit padding are the
    standard's."""
    rows, cols = pixels.shape
    samples = pixels.astype(np.int64) & 0xFFFF
    predicted = np.empty_like(samples)
    predicted[0, 0] = 1 << 15
    predicted[0, 1:] = samples[0, :-1]
    predicted[1:, 0] = samples[:-1, 0]
    predicted[1:, 1:] = samples[1:, :-1]
    # Differences are taken modulo 2**16 into -32767..32768; 32768 is category 16, with no extra bits.
    differences = (samples - predicted) & 0xFFFF
    differences = np.where(differences > 1 << 15, differences - (1 << 16), differences)
    bits = []
    for value in differences.ravel().tolist():
        category = abs(value).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            extra = value if value > 0 else value + (1 << category) - 1
            bits.append(format(extra, f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    scan = bytearray()
    for start in range(0, len(stream), 8):
        byte = int(stream[start : start + 8], 2)
        scan.append(byte)
        if byte == 0xFF:
            scan.append(0x00)

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    huffman = bytes([0x00, 0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    frame = bytes([16]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    scan_header = bytes([1, 1, 0x00, 1, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xC4, huffman)
        + segment(0xC3, frame)
        + segment(0xDA, scan_header)
        + bytes(scan)
        + b"\xff\xd9"
    )


def set_jpeg_lossless_pixels(ds, frames: np.ndarray) -> None:
    """Replace ``ds``'s pixels with ``frames`` (``[D, H, W]`` int16, or one ``[H, W]`` frame), JPEG
    Lossless encoded one codestream per frame."""
    frames = np.asarray(frames, dtype=np.int16)
    stack = frames[None] if frames.ndim == 2 else frames
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if frames.ndim == 3:
        ds.NumberOfFrames = stack.shape[0]
    ds.PixelData = encapsulate([jpeg_lossless_sv1(frame) for frame in stack])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1


def write_jpeg_lossless_volume(path: Path, template: Path, frames: np.ndarray) -> Path:
    """A multi-frame JPEG Lossless file holding ``frames`` (raw stored values), with the rest of its
    header (modality, rescale, geometry) from ``template``."""
    ds = copy.deepcopy(pydicom.dcmread(template))
    set_jpeg_lossless_pixels(ds, frames)
    ds.save_as(path)
    return path
