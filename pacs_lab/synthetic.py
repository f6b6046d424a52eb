"""Synthetic DICOM series for tests, benchmarks and the rule tester's examples.

Plain CT/MR single-frame series with consistent patient-space geometry and
realistic headers. They carry no anatomy (the phantoms with ground truth come
with the demo models); they exist to exercise the network, storage and routing
paths with data the project makes itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pacs_lab.phantoms.brain import save_series

UID_ROOT = "1.2.826.0.1.3680043.10.1453."  # pacs-node test data (pydicom's organisation root + suffix)


def new_uid() -> str:
    """A fresh UID under the test-data root."""
    return str(generate_uid(prefix=UID_ROOT))


def make_series(
    n: int,
    *,
    modality: str = "CT",
    rows: int = 64,
    cols: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5),
    seed: int = 0,
    pixels: bool = True,
    **header: Any,
) -> Iterator[Dataset]:
    """Yield ``n`` axial single-frame instances of one series.

    Extra keyword arguments become header attributes of every instance
    (``SeriesDescription="DWI"``, ``ImagesInAcquisition=n``, ...).
    """
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    rng = np.random.default_rng(seed)
    # One frame of reference per study (scanner coordinates of the exam), never equal to the study UID.
    frame_of_reference = str(generate_uid(prefix=UID_ROOT, entropy_srcs=[study_uid, "frame-of-reference"]))
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        sop_uid = generate_uid(prefix=UID_ROOT)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = "20261120"
        ds.SeriesDate = "20261120"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = modality
        ds.Manufacturer = "SIEMENS"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic"
        ds.SeriesDescription = "Abdomen 3.0 B30f PV" if modality == "CT" else "t2_tse_tra"
        ds.PatientName = "Synthetic^Patient"
        ds.PatientID = "SYN0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = spacing[2]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-cols * spacing[0] / 2, -rows * spacing[1] / 2, i * spacing[2]]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
        for key, value in header.items():
            setattr(ds, key, value)
        if pixels:
            ds.PixelData = rng.integers(0, 2000, size=(rows, cols), dtype=np.int16).tobytes()
        yield ds


def write_series(folder: str | Path, datasets: Iterator[Dataset] | list[Dataset]) -> list[Path]:
    """Write datasets as Part 10 files named by SOP Instance UID."""

    return save_series(folder, list(datasets))


#: Row (increasing column index) and column (increasing row index) directions, LPS.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def make_oriented_series(
    values_at: Any,
    *,
    orientation: str = "axial",
    rows: int = 48,
    cols: int = 48,
    slices: int = 20,
    spacing: tuple[float, float, float] = (2.0, 2.0, 3.0),
    center: tuple[float, float, float] = (0.0, 0.0, 0.0),
    flip_rows: bool = False,
    reverse: bool = False,
    modality: str = "MR",
    study_uid: str | None = None,
    **header: Any,
) -> list[Dataset]:
    """A single-frame series sampling ``values_at`` on a grid of known orientation.

    ``values_at`` maps an (N, 3) array of LPS points (mm) to N pixel values.
    ``spacing`` is (column spacing, row spacing, slice spacing) in mm.
    ``flip_rows`` makes columns run the other way along the row direction;
    ``reverse`` numbers the instances against the slice normal.
    """
    row_dir = np.array(ORIENTATIONS[orientation][0])
    col_dir = np.array(ORIENTATIONS[orientation][1])
    if flip_rows:
        row_dir = -row_dir
    normal = np.cross(row_dir, col_dir)
    sx, sy, sz = spacing
    origin = (
        np.asarray(center, dtype=float)
        - row_dir * sx * (cols - 1) / 2
        - col_dir * sy * (rows - 1) / 2
        - normal * sz * (slices - 1) / 2
    )
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    base = list(
        make_series(slices, modality=modality, rows=rows, cols=cols, study_uid=study_uid, pixels=False, **header)
    )
    out = []
    for k, ds in enumerate(base):
        pos = origin + normal * sz * k
        pts = pos + cc[..., None] * sx * row_dir + rr[..., None] * sy * col_dir
        values = np.asarray(values_at(pts.reshape(-1, 3)), dtype=np.float64).reshape(rows, cols)
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.InstanceNumber = slices - k if reverse else k + 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.clip(np.rint(values), 0, 65535).astype(np.uint16).tobytes()
        if "RescaleIntercept" in ds:
            del ds.RescaleIntercept
            del ds.RescaleSlope
        out.append(ds)
    return out[::-1] if reverse else out
