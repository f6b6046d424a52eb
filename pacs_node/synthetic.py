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
        ds.FrameOfReferenceUID = study_uid + ".1" if len(study_uid) < 62 else study_uid
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
