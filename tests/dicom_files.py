"""DICOM files the tests write themselves: radiographs in every encoding the service reads, and the
kinds it must refuse. Pixel data is compressed with pydicom's encoders (RLE, JPEG 2000, JPEG-LS);
JPEG Lossless (process 14), which no installed library encodes, with the small encoder below."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

from tests.helpers import xray_like

STUDY = "1.2.826.0.1.3680043.8.498.1"


def radiograph(
    height: int = 48,
    width: int = 40,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    seed: int = 0,
) -> tuple[Dataset, np.ndarray]:
    """A one-frame DX image of ``xray_like`` intensities and those stored values (no VOI, no rescale)."""
    intensities = xray_like(height, width, seed)
    peak = 2**bits_stored - 1
    stored = np.round(intensities * peak).astype(np.int64)
    if photometric == "MONOCHROME1":
        stored = peak - stored
    if signed:
        stored = stored - 2 ** (bits_stored - 1)
    allocated = 8 if bits_stored <= 8 else 16
    dtype = {(8, False): np.uint8, (8, True): np.int8, (16, False): np.uint16, (16, True): np.int16}[allocated, signed]
    ds = _dataset(DigitalXRayImageStorageForPresentation)
    ds.Modality = "DX"
    ds.Rows, ds.Columns = height, width
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.astype(dtype).tobytes()
    return ds, stored


def _dataset(sop_class: UID) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "MRN-889977", "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "42", "ACC-7"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    return ds


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def malformed_value() -> bytes:
    """NumberOfFrames stored as the IS '1A': pydicom reads values lazily and fails on first use."""
    ds, _ = radiograph()
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)
    return encode(ds)


def structured_report() -> bytes:
    ds = _dataset(BasicTextSRStorage)
    ds.Modality = "SR"
    return encode(ds)


def jpeg_baseline(ds: Dataset, stored: np.ndarray, quality: int = 90) -> Dataset:
    """``ds`` (8 bits stored) with its pixel data as a lossy baseline JPEG (Pillow's encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(stored.astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def grey_in_colour(ds: Dataset, stored: np.ndarray, tint: int = 0) -> Dataset:
    """``ds`` (8 bits stored) as RGB: every channel the grey, the red one ``tint`` levels brighter."""
    rgb = np.repeat(stored.astype(np.int64)[..., None], 3, axis=2)
    rgb[..., 0] = np.clip(rgb[..., 0] + tint, 0, 255)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.astype(np.uint8).tobytes()
    return ds


def jpeg_lossless(ds: Dataset, stored: np.ndarray) -> Dataset:
    """``ds`` with its pixel data as JPEG Lossless, process 14, first-order prediction."""
    ds.PixelData = encapsulate([_jpeg_lossless_frame(stored.astype(np.int64), int(ds.BitsStored))])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    return ds


def _jpeg_lossless_frame(pixels: np.ndarray, precision: int) -> bytes:
    """SOF3 with one component, Huffman table of all 17 difference categories at 5 bits each,
    predictor 1 (left neighbour; above at the start of a row; 2^(P-1) for the first pixel)."""
    height, width = pixels.shape
    predicted = np.empty_like(pixels)
    predicted[0, 0] = 1 << (precision - 1)
    predicted[0, 1:] = pixels[0, :-1]
    predicted[1:, 0] = pixels[:-1, 0]
    predicted[1:, 1:] = pixels[1:, :-1]
    bits = []
    for diff in ((pixels - predicted) % 65536).ravel():
        diff = int(diff) - 65536 if diff >= 32768 else int(diff)
        category = abs(diff).bit_length()
        bits.append(format(category, "05b"))
        if 0 < category < 16:
            bits.append(format(diff if diff > 0 else diff - 1 + (1 << category), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data += bytes([byte, 0]) if byte == 0xFF else bytes([byte])

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof = bytes([precision]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])
    return b"\xff\xd8" + segment(0xC3, sof) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(data) + b"\xff\xd9"
