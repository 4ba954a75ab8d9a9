"""Example inputs for the README's commands, written by ``prism make-example``: a phantom chest
radiograph with support devices and cardiomegaly as a PNG and as a DICOM DX image, and the guided
method's anatomy mask. Synthetic, so nothing in them is anyone's data."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from models.imaging.files import encode_png
from models.request.findings import CONDITIONS
from phantoms.captions import labels
from phantoms.render import Anatomy, Findings, anatomy_mask, render, training_phantom

EXAMPLE_SEED = 2025
SIZE = 128
COLUMNS = slice(12, 116)  # portrait, 128 x 104, as chest films are
FINDINGS = Findings(cardiomegaly=True, pleural_effusion=False, support_devices=True)
FILES = ("phantom.png", "study.dcm", "anatomy.png")
BATCH_FILES = ("batch.zip", "batch.csv", "batch")
"""The batch example: a ZIP of phantoms, its CheXpert manifest, and the same images as a folder."""
BATCH_SIZE = 8


def _dicom(pixels: np.ndarray) -> bytes:
    """A one-frame 12-bit DX For Presentation image of ``pixels`` with a synthetic patient."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "PHANTOM^EXAMPLE", "PHANTOM-0001", "O", ""
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = "DX", 1, 1, ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.round(np.clip(pixels, 0, 1) * 4095).astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_examples(out: Path) -> list[Path]:
    """Write :data:`FILES` into ``out``; returns their paths."""
    anatomy = Anatomy.sample(EXAMPLE_SEED, SIZE)
    pixels = render(anatomy, FINDINGS)[:, COLUMNS]
    keep = anatomy_mask(anatomy)[:, COLUMNS].astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    contents = (encode_png(pixels, 16), _dicom(pixels), encode_png(keep, 8))
    paths = [out / name for name in FILES]
    for path, data in zip(paths, contents, strict=True):
        path.write_bytes(data)
    return paths


def phantom_batch(
    n: int, dicom_every: int = 0, folder: str = "scans", size: tuple[int, int] | None = None
) -> tuple[bytes, bytes, list[dict]]:
    """A ZIP of ``n`` training phantoms (every ``dicom_every``-th as DICOM) and its manifest in
    CheXpert's columns; returns the ZIP, the CSV and the manifest's rows. With ``size`` (height,
    width) each phantom is resized to it, with noise so that it compresses as a real study does."""
    rows, buffer = [], io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(n):
            pixels, findings = training_phantom(i)
            dicom = dicom_every and i % dicom_every == dicom_every - 1
            name = f"{folder}/p{i:03d}.{'dcm' if dicom else 'png'}"
            intensities = pixels.astype(np.float32) / 255
            if size is not None:
                intensities = _study_sized(intensities, size, seed=i)
            archive.writestr(name, _dicom(intensities) if dicom else encode_png(intensities, 8))
            rows.append({"Path": name, **dict.fromkeys(CONDITIONS, ""), **labels(findings)})
    text = io.StringIO()
    writer = csv.DictWriter(text, ["Path", *CONDITIONS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue(), text.getvalue().encode(), rows


def _study_sized(intensities: np.ndarray, size: tuple[int, int], seed: int) -> np.ndarray:
    """``intensities`` resized to ``size`` (height, width) with noise of 2 % of the range."""
    height, width = size
    image = Image.fromarray(intensities, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng(seed).normal(0.0, 0.02, (height, width)).astype(np.float32)
    return np.clip(np.asarray(image) + noise, 0.0, 1.0)


def write_batch_example(out: Path) -> list[Path]:
    """Write :data:`BATCH_FILES` into ``out``: for ``POST /batches`` and for ``prism batch``."""
    archive, manifest, _ = phantom_batch(BATCH_SIZE, dicom_every=4)
    paths = [out / name for name in BATCH_FILES]
    paths[0].write_bytes(archive)
    paths[1].write_bytes(manifest)
    zipfile.ZipFile(io.BytesIO(archive)).extractall(paths[2])
    return paths
