"""Seeded brain phantoms written as DICOM MR series, with ground-truth labels.

A continuous head model is defined in *head coordinates* (LPS mm, head centre at
the origin: +x the patient's left, +y posterior, +z head): scalp/soft tissue,
skull, CSF, a folded grey-matter ribbon over white matter, lateral/third/fourth
ventricles, deep grey nuclei, cerebellum (posterior-inferior, with folia),
brainstem, and the iron-rich nuclei (red nucleus, substantia nigra, globus
pallidus, dentate nuclei). Every case draws, from its seed, a small random
rotation, per-axis scale and shift that map head coordinates to patient
coordinates, a smooth bias field, tissue contrasts and noise; every series
samples the model at its own voxel centres (vectorised), so series of one case
at different resolutions and orientations agree in patient space.

* :func:`make_stroke_case`: DWI (b0 + b1000 trace images in one series), a
  scanner-style ADC series on the DWI grid, and a FLAIR series on another grid
  (oblique axial, or sagittal for Philips), with 1-5 irregular acute infarcts.
* :func:`make_qsm_case`: a QSM series (ppb) with the left (label 1, patient +x)
  and right (label 2) dentate nuclei as truth and iron-rich distractors.

Nothing is random outside the seed: the same seed gives identical pixels and
UIDs (UIDs come from :func:`pydicom.uid.generate_uid` with entropy sources).
:func:`write_series` (datasets from arrays on a :class:`Grid`) and
:func:`save_series` (Part-10 files) are reusable by other phantom modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from inference.volume import Volume

__all__ = [
    "UID_ROOT",
    "VENDORS",
    "Grid",
    "QsmCase",
    "StrokeCase",
    "Tissue",
    "make_qsm_case",
    "make_stroke_case",
    "save_series",
    "stroke_lesion_volumes",
    "write_series",
]

UID_ROOT = "1.2.826.0.1.3680043.10.1453."  # pacs-node test data
VENDORS = ("siemens", "ge", "philips")


class Tissue:
    """Tissue codes of the model (the values of ``StrokeCase.tissue`` / ``QsmCase.tissue``)."""

    AIR = 0
    SOFT = 1  # scalp, face, neck
    BONE = 2
    CSF = 3  # incl. ventricles and sulci
    GM = 4  # cerebral cortex
    WM = 5  # cerebral white matter
    DEEP_GM = 6  # caudate, putamen, thalamus
    GP = 7  # globus pallidus
    CB_GM = 8
    CB_WM = 9
    BRAINSTEM = 10
    RN = 11  # red nucleus
    SN = 12  # substantia nigra
    DN_LEFT = 13  # dentate nucleus, patient left (+x)
    DN_RIGHT = 14
    COUNT = 15

    CEREBRUM = (GM, WM, DEEP_GM, GP)
    PARENCHYMA = (GM, WM, DEEP_GM, GP, CB_GM, CB_WM, BRAINSTEM, RN, SN, DN_LEFT, DN_RIGHT)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular image grid in patient space (LPS mm).

    ``spacing`` and ``size`` are (x, y, z) = (column, row, slice); ``row_dir`` is
    the LPS direction of increasing column index (the first ImageOrientationPatient
    triplet), ``col_dir`` that of increasing row index; slices advance along
    ``row_dir x col_dir``. ``origin`` is the centre of voxel [0, 0, 0].
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    @classmethod
    def centred(
        cls,
        centre: ArrayLike,
        row_dir: ArrayLike,
        col_dir: ArrayLike,
        spacing: tuple[float, float, float],
        size: tuple[int, int, int],
    ) -> Grid:
        """A grid whose middle lies at ``centre``; the directions are orthonormalised."""
        r = np.asarray(row_dir, dtype=np.float64)
        r = r / np.linalg.norm(r)
        c = np.asarray(col_dir, dtype=np.float64)
        c = c - r * float(r @ c)
        c = c / np.linalg.norm(c)
        n = np.cross(r, c)
        sx, sy, sz = (float(s) for s in spacing)
        nx, ny, nz = (int(v) for v in size)
        origin = np.asarray(centre, dtype=np.float64) - (r * sx * (nx - 1) + c * sy * (ny - 1) + n * sz * (nz - 1)) / 2
        return cls(origin=origin, row_dir=r, col_dir=c, spacing=(sx, sy, sz), size=(nx, ny, nz))

    @property
    def normal(self) -> np.ndarray:
        """Slice normal, ``row_dir x col_dir``."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the LPS directions of +x, +y, +z index."""
        return np.stack([self.row_dir, self.col_dir, self.normal], axis=1)

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + self.normal * self.spacing[2] * k

    def points(self) -> np.ndarray:
        """LPS positions of all voxel centres, shape (z, y, x, 3), float64."""
        nx, ny, nz = self.size
        sx, sy, sz = self.spacing
        i = np.arange(nx)[None, None, :, None] * sx * self.row_dir
        j = np.arange(ny)[None, :, None, None] * sy * self.col_dir
        k = np.arange(nz)[:, None, None, None] * sz * self.normal
        return self.origin + i + j + k

    def volume(self, array: np.ndarray, *, series_uid: str = "", frame_of_reference_uid: str = "") -> Volume:
        """A :class:`Volume` holding ``array`` (shape (z, y, x)) on this grid."""
        return Volume(
            array=array,
            origin=self.origin,
            spacing=self.spacing,
            direction=self.direction,
            series_uid=series_uid,
            frame_of_reference_uid=frame_of_reference_uid,
        )


# --------------------------------------------------------------------------- DICOM writing


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=["pacs-node-phantom", *(str(p) for p in parts)]))


def write_series(
    grid: Grid,
    blocks: Sequence[np.ndarray],
    *,
    header: dict[str, Any],
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    block_headers: Sequence[dict[str, Any]] | None = None,
    decorate: Callable[[Dataset, int, int], None] | None = None,
    signed: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> list[Dataset]:
    """Single-frame MR instances of one series sampling arrays on ``grid``.

    Args:
        grid: Geometry shared by all blocks.
        blocks: One or more arrays of shape ``grid.shape`` (z, y, x) holding real
            values; each block becomes one image per slice position (several
            blocks = several images per position, e.g. b-values). Instances are
            numbered block by block, slice by slice.
        header: Attributes (keyword -> value) set on every instance; they may
            override the defaults written here.
        study_uid, series_uid, frame_of_reference_uid: The UIDs of the series.
            SOP Instance UIDs are derived from ``series_uid`` deterministically.
        block_headers: Per-block attributes (e.g. ``{"DiffusionBValue": 1000.0}``).
        decorate: Called as ``decorate(ds, block_index, slice_index)`` last, for
            private tags and the like.
        signed: Store int16 (PixelRepresentation 1) instead of uint16.
        slope, intercept: Stored value = round((value - intercept) / slope); the
            Rescale attributes are written when they are not (1, 0).

    Returns:
        The datasets (with file meta), ready for :func:`save_series`.
    """
    nz, ny, nx = grid.shape
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    dtype = np.int16 if signed else np.uint16
    rescaled = slope != 1.0 or intercept != 0.0
    normal = grid.normal
    out: list[Dataset] = []
    for b, block in enumerate(blocks):
        values = np.asarray(block, dtype=np.float64)
        if values.shape != grid.shape:
            raise ValueError(f"block {b} has shape {values.shape}; the grid needs {grid.shape} (z, y, x)")
        stored = np.clip(np.rint((values - intercept) / slope), lo, hi).astype(dtype)
        extra = block_headers[b] if block_headers else {}
        for k in range(nz):
            sop_uid = _uid(series_uid, b, k)
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = sop_uid
            ds.Modality = "MR"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.FrameOfReferenceUID = frame_of_reference_uid
            ds.PositionReferenceIndicator = ""
            ds.InstanceNumber = b * nz + k + 1
            pos = grid.slice_position(k)
            ds.ImagePositionPatient = [round(float(v), 6) for v in pos]
            ds.ImageOrientationPatient = [round(float(v), 8) for v in (*grid.row_dir, *grid.col_dir)]
            ds.SliceLocation = round(float(pos @ normal), 6)
            ds.PixelSpacing = [grid.spacing[1], grid.spacing[0]]
            ds.SliceThickness = grid.spacing[2]
            ds.SpacingBetweenSlices = grid.spacing[2]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ny
            ds.Columns = nx
            ds.BitsAllocated = 16
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.PixelRepresentation = 1 if signed else 0
            if rescaled:
                ds.RescaleIntercept = intercept
                ds.RescaleSlope = slope
                ds.RescaleType = "US"
            for key, value in {**header, **extra}.items():
                setattr(ds, key, value)
            ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
            if decorate is not None:
                decorate(ds, b, k)
            out.append(ds)
    return out


def save_series(folder: str | Path, datasets: Sequence[Dataset]) -> list[Path]:
    """Write datasets as Part-10 files ``<folder>/<SOPInstanceUID>.dcm``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- the head model


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    result: np.ndarray = rz @ ry @ rx
    return result


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _e2(q: np.ndarray, centre: ArrayLike, radii: ArrayLike, rot: np.ndarray | None = None) -> np.ndarray:
    """Squared normalised ellipsoid radius of points q (N, 3); < 1 inside. ``rot`` columns = ellipsoid axes."""
    c = [float(v) for v in np.asarray(centre).ravel()]
    r = [float(v) for v in np.asarray(radii).ravel()]
    if rot is None:
        d = [q[:, i] - c[i] for i in range(3)]
    else:
        x, y, z = (q[:, i] - c[i] for i in range(3))
        m = np.asarray(rot, dtype=np.float64)
        d = [x * m[0, i] + y * m[1, i] + z * m[2, i] for i in range(3)]
    result: np.ndarray = (d[0] * (1 / r[0])) ** 2 + (d[1] * (1 / r[1])) ** 2 + (d[2] * (1 / r[2])) ** 2
    return result


_CEREBRUM = ((0.0, -5.0, 15.0), (68.0, 84.0, 58.0))
_CEREBELLUM = ((0.0, 46.0, -36.0), (50.0, 28.0, 22.0))
_BRAINSTEM = ((0.0, 20.0, -26.0), (15.0, 14.0, 36.0))
_PARTS = (_CEREBRUM, _CEREBELLUM, _BRAINSTEM)


@dataclass(frozen=True, eq=False)
class _Lesion:
    centres: np.ndarray  # (m, 3) head coordinates
    radii: np.ndarray  # (m, 3)
    rots: np.ndarray  # (m, 3, 3)
    side: float  # +1 left (+x), -1 right

    def scaled(self, factor: float, about: np.ndarray) -> _Lesion:
        return _Lesion(about + (self.centres - about) * factor, self.radii * factor, self.rots, self.side)

    def inside(self, q: np.ndarray) -> np.ndarray:
        lo, hi = self.bounds()
        box = np.ones(len(q), dtype=bool)
        for i in range(3):
            col = q[:, i]
            box &= (col >= lo[i]) & (col <= hi[i])
        idx = np.flatnonzero(box)
        mask = np.zeros(len(q), dtype=bool)
        if idx.size == 0:
            return mask
        sub = q[idx]
        hit = np.zeros(len(idx), dtype=bool)
        for c, r, rot in zip(self.centres, self.radii, self.rots, strict=True):
            hit |= _e2(sub, c, r, rot) < 1.0
        hit &= sub[:, 0] * self.side > 1.0  # stays in its hemisphere
        mask[idx[hit]] = True
        return mask

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radii.max(axis=1)[:, None]
        return (self.centres - reach).min(axis=0), (self.centres + reach).max(axis=0)


class _Head:
    """The continuous model of one case: a head-to-patient transform plus anatomy parameters."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rotation = _rotation(rng, 6.0)
        self.scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)
        self.shift = rng.uniform(-4.0, 4.0, 3)
        self.gyri_phase = rng.uniform(0, 2 * math.pi, 4)
        self.gyri_freq = rng.uniform(0.15, 0.2, 3)
        self.folia_phase = float(rng.uniform(0, 2 * math.pi))
        self.bias_coeff = rng.uniform(-0.12, 0.12, 3)
        self.bias_quad = float(rng.uniform(-0.1, 0.1))
        self.dn_tilt = rng.uniform(-12, 12, 2)  # degrees about z, per side
        self.dn_radii = rng.uniform(0.9, 1.1, (2, 3)) * np.array([5.0, 8.5, 6.0])

    # -- coordinates -----------------------------------------------------------

    def to_head(self, lps: np.ndarray) -> np.ndarray:
        """Head coordinates (float32, (N, 3)) of LPS points (..., 3)."""
        p = lps.reshape(-1, 3).astype(np.float32) - self.shift.astype(np.float32)
        m = self.rotation
        q = np.empty_like(p)
        for i in range(3):  # q = diag(1/s) R^T p, column by column (faster than a (N,3)@(3,3) matmul)
            q[:, i] = (p[:, 0] * m[0, i] + p[:, 1] * m[1, i] + p[:, 2] * m[2, i]) * (1 / self.scale[i])
        return q

    def to_lps(self, q: np.ndarray) -> np.ndarray:
        result: np.ndarray = (np.asarray(q) * self.scale) @ self.rotation.T + self.shift
        return result

    @property
    def volume_factor(self) -> float:
        """mm³ in patient space per mm³ in head coordinates."""
        return float(np.prod(self.scale))

    def bias(self, q: np.ndarray) -> np.ndarray:
        """Smooth multiplicative bias field at head-coordinate points (N, 3), shape (N,)."""
        q = q / 100.0
        result: np.ndarray = np.exp(q @ self.bias_coeff.astype(np.float32) + self.bias_quad * (q**2).sum(axis=1))
        return result

    # -- anatomy -----------------------------------------------------------------

    def tissue(self, q: np.ndarray) -> np.ndarray:
        """Tissue code (uint8, (N,)) of head-coordinate points q (N, 3)."""
        t = np.zeros(len(q), dtype=np.uint8)
        head = np.zeros(len(q), dtype=bool)
        skull = np.zeros(len(q), dtype=bool)
        ic = np.zeros(len(q), dtype=bool)
        for centre, radii in _PARTS:
            r = np.asarray(radii)
            head |= _e2(q, centre, r + 16.0) < 1
            skull |= _e2(q, centre, r + 10.0) < 1
            ic |= _e2(q, centre, r + 4.0) < 1
        t[head] = Tissue.SOFT
        t[skull] = Tissue.BONE
        idx = np.flatnonzero(ic)
        t[idx] = self._brain(q[idx])
        return t

    def _brain(self, q: np.ndarray) -> np.ndarray:
        x, y, z = q[:, 0], q[:, 1], q[:, 2]
        out = np.full(len(q), Tissue.CSF, dtype=np.uint8)
        rc = np.sqrt(_e2(q, *_CEREBRUM))
        rcb = np.sqrt(_e2(q, *_CEREBELLUM))
        bs = _e2(q, *_BRAINSTEM) < 1
        cb_zone = _e2(q, _CEREBELLUM[0], np.asarray(_CEREBELLUM[1]) + 3.0) < 1  # incl. the tentorium gap
        f, ph = self.gyri_freq, self.gyri_phase
        g = (  # a gyroid-like labyrinth: its zero set are the sulci, grey matter lines them
            np.sin(f[0] * x + 1.5 * np.sin(0.2 * y + ph[0]))
            + np.sin(f[1] * y + 1.5 * np.sin(0.17 * z + ph[1]) + ph[2])
            + np.sin(f[2] * z + 1.2 * np.sin(0.19 * x) + ph[3])
        )
        sulcus = (np.abs(g) < 0.16) & (rc > 0.8)
        fissure = (np.abs(x) < 1.5) & ((z > 30) | (np.abs(y + 5) > 42)) & (z > -10)
        cerebrum = (rc < 1) & ~cb_zone & ~bs & ~sulcus & ~fissure
        gm = cerebrum & ((rc > 0.94) | ((np.abs(g) < 0.75) & (rc > 0.76)))
        out[cerebrum] = Tissue.WM
        out[gm] = Tissue.GM
        for sx in (-1.0, 1.0):
            deep = (
                (_e2(q, (13 * sx, -12, 18), (5, 10, 7)) < 1)  # caudate head
                | (_e2(q, (24 * sx, -2, 6), (6, 14, 10)) < 1)  # putamen
                | (_e2(q, (10 * sx, 14, 8), (9, 14, 9)) < 1)  # thalamus
            )
            out[deep & cerebrum] = Tissue.DEEP_GM
            out[(_e2(q, (18 * sx, 0, 4), (4, 9, 6)) < 1) & cerebrum] = Tissue.GP
        ventricles = (
            (_e2(q, (9, -2, 18), (6, 28, 9)) < 1)
            | (_e2(q, (-9, -2, 18), (6, 28, 9)) < 1)
            | (_e2(q, (0, 8, 2), (2, 12, 8)) < 1)
        )
        out[ventricles & cerebrum] = Tissue.CSF
        # cerebellum with folia and a white-matter core
        cb = (rcb < 1) & ~bs
        folia = np.sin(0.9 * z + 0.25 * y + 0.1 * np.abs(x) + self.folia_phase)
        cb_csf = cb & (folia > 0.8) & (rcb > 0.72)
        cb_wm = cb & ((_e2(q, (0, 44, -34), (34, 15, 11)) < 1) | ((folia < -0.55) & (rcb < 0.82)))
        out[cb] = Tissue.CB_GM
        out[cb_wm] = Tissue.CB_WM
        out[cb_csf] = Tissue.CSF
        for side, code in ((1.0, Tissue.DN_LEFT), (-1.0, Tissue.DN_RIGHT)):
            out[self._dentate(q, side)] = code
        out[bs] = Tissue.BRAINSTEM
        out[bs & (_e2(q, (0, 33, -38), (6, 4, 6)) < 1)] = Tissue.CSF  # fourth ventricle
        for sx in (-1.0, 1.0):
            out[bs & (_e2(q, (4 * sx, 19, -4), (3, 3.5, 3.5)) < 1)] = Tissue.RN
            sn_rot = _z_rotation(30.0 * sx)
            out[bs & (_e2(q, (9 * sx, 15, -8), (2.5, 6, 3), sn_rot) < 1)] = Tissue.SN
        return out

    def _dentate(self, q: np.ndarray, side: float) -> np.ndarray:
        """A folded C-shaped band (hilum open anteromedially) in the cerebellar hemisphere on ``side``."""
        s = 0 if side > 0 else 1
        centre = np.array([15.0 * side, 45.0, -32.0], dtype=np.float32)
        near = np.flatnonzero(np.all(np.abs(q - centre) < 12.0, axis=1))
        mask = np.zeros(len(q), dtype=bool)
        if near.size == 0:
            return mask
        rot = _z_rotation(float(self.dn_tilt[s]) * side).astype(np.float32)
        d = (q[near] - centre) @ rot
        radii = self.dn_radii[s].astype(np.float32)
        angle = np.arctan2(d[:, 1], d[:, 0])
        rn = np.sqrt(((d / radii) ** 2).sum(axis=1))
        rn = rn * (1.0 + 0.12 * np.sin(7.0 * angle))  # folds
        band = np.abs(rn - 1.0) * float(radii.mean()) < 1.3
        hilum = np.array([-side, -1.0, 0.0], dtype=np.float32) / math.sqrt(2.0)  # medial + anterior
        dxy = d.copy()
        dxy[:, 2] = 0
        cos = (dxy @ hilum) / (np.linalg.norm(dxy, axis=1) + 1e-6)
        mask[near[band & (cos < 0.5)]] = True
        return mask


def _z_rotation(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------- vendors and headers

_VENDOR_INFO: dict[str, dict[str, str]] = {
    "siemens": {
        "Manufacturer": "SIEMENS",
        "ManufacturerModelName": "MAGNETOM Skyra",
        "SoftwareVersions": "syngo MR E11",
        "dwi": "ep2d_diff_3scan_trace_p2",
        "adc": "ep2d_diff_3scan_trace_p2_ADC",
        "flair": "t2_tirm_tra_dark-fluid",
        "qsm": "QSM",
    },
    "ge": {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "DISCOVERY MR750",
        "SoftwareVersions": "27\\LX\\MR Software release:DV26.0_R03",
        "dwi": "DWI",
        "adc": "Apparent Diffusion Coefficient (mm2/s)",
        "flair": "Ax T2 FLAIR",
        "qsm": "QSM_SWAN",
    },
    "philips": {
        "Manufacturer": "Philips Medical Systems",
        "ManufacturerModelName": "Ingenia",
        "SoftwareVersions": "5.6.1\\5.6.1.2",
        "dwi": "DWI_SENSE",
        "adc": "dADC",
        "flair": "sT2W_FLAIR",
        "qsm": "QSM_Philips",
    },
}

_SIEMENS_CREATOR = "SIEMENS MR HEADER"
_GE_CREATOR = "GEMS_PARM_01"
_PHILIPS_CREATOR = "Philips Imaging DD 001"


def _pick_vendor(vendor: str | None, rng: np.random.Generator) -> str:
    drawn = VENDORS[int(rng.integers(len(VENDORS)))]  # always drawn, so a vendor override keeps the anatomy
    if vendor is None:
        return drawn
    key = vendor.strip().lower()
    if key not in _VENDOR_INFO:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {', '.join(VENDORS)} or None (from the seed)")
    return key


def _patient_header(kind: str, seed: int, vendor: str, rng: np.random.Generator, study_uid: str) -> dict[str, Any]:
    info = _VENDOR_INFO[vendor]
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    age = int(rng.integers(35, 90))
    hour, minute = int(rng.integers(7, 20)), int(rng.integers(0, 60))
    return {
        "PatientName": f"PHANTOM^{kind.upper()}^{seed}",
        "PatientID": f"PH{kind.upper()}{seed:06d}",
        "PatientBirthDate": f"{2026 - age:04d}0101",
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "PatientAge": f"{age:03d}Y",
        "StudyDate": f"2026{month:02d}{day:02d}",
        "SeriesDate": f"2026{month:02d}{day:02d}",
        "AcquisitionDate": f"2026{month:02d}{day:02d}",
        "ContentDate": f"2026{month:02d}{day:02d}",
        "StudyTime": f"{hour:02d}{minute:02d}00",
        "AccessionNumber": f"PH{seed:08d}"[-16:],
        "StudyID": str(seed % 100000),
        "StudyDescription": "MRI HEAD STROKE" if kind == "stroke" else "MRI HEAD QSM",
        "ReferringPhysicianName": "",
        "InstitutionName": "pacs-node phantom",
        "Manufacturer": info["Manufacturer"],
        "ManufacturerModelName": info["ManufacturerModelName"],
        "SoftwareVersions": info["SoftwareVersions"],
        "DeviceSerialNumber": str(10000 + seed % 90000),
        "StationName": f"{vendor.upper()}MR1",
        "MagneticFieldStrength": 3.0 if rng.random() < 0.7 else 1.5,
        "ImagingFrequency": 123.2,
        "ImagedNucleus": "1H",
        "BodyPartExamined": "HEAD",
        "PatientPosition": "HFS",
        "ReceiveCoilName": "Head_32" if vendor == "siemens" else "HNS Head",
        "StudyInstanceUID": study_uid,
    }


def _series_header(description: str, number: int, seconds: int, study_time: str) -> dict[str, Any]:
    h, m = int(study_time[:2]), int(study_time[2:4])
    total = h * 3600 + m * 60 + seconds
    time = f"{total // 3600 % 24:02d}{total // 60 % 60:02d}{total % 60:02d}"
    return {
        "SeriesDescription": description,
        "ProtocolName": description,
        "SeriesNumber": number,
        "AcquisitionNumber": 1,
        "SeriesTime": time,
        "AcquisitionTime": time,
        "ContentTime": time,
    }


# --------------------------------------------------------------------------- shared sampling helpers


def _sample(head: _Head, grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LPS points (N, 3), head points (N, 3), tissue (N,)) at the voxel centres of ``grid``."""
    lps = grid.points().reshape(-1, 3)
    q = head.to_head(lps)
    return lps, q, head.tissue(q)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.normal(0.0, sigma, signal.shape)
    n2 = rng.normal(0.0, sigma, signal.shape)
    result: np.ndarray = np.sqrt((signal + n1) ** 2 + n2**2)
    return result


def _psf(array: np.ndarray, sigma: float = 0.6) -> np.ndarray:
    """In-plane blur (acquisition point-spread), slices independent."""
    result: np.ndarray = ndimage.gaussian_filter(array, sigma=(0.0, sigma, sigma), mode="nearest")
    return result


def _lut(values: dict[int, float]) -> np.ndarray:
    table = np.zeros(Tissue.COUNT, dtype=np.float64)
    for code, value in values.items():
        table[code] = value
    return table


def _jitter(table: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    result: np.ndarray = table * rng.uniform(1 - amount, 1 + amount, table.shape)
    return result


# --------------------------------------------------------------------------- stroke


@dataclass(eq=False)
class StrokeCase:
    """One stroke phantom: DWI (b0 + b1000), ADC, FLAIR and the lesion truth.

    Attributes:
        dwi: One series, two images per slice position (DiffusionBValue 0 and 1000).
        adc: Derived ADC series on the DWI grid, in 1e-6 mm²/s.
        flair: FLAIR series on its own grid (other orientation and resolution),
            same study and frame of reference.
        labels: Lesion label map on the DWI grid (uint8, 1 = lesion); its
            series_uid is the DWI's.
        lesion_volumes_ml: Per-lesion volume in mL from the *continuous* model
            (union of ellipsoids clipped to cerebral parenchyma of its hemisphere,
            integrated on a fine grid, in patient space) -- not the voxel count of
            ``labels``, which differs by partial-volume effects, most for small lesions.
        seed: The seed that reproduces the case.
        vendor: "siemens", "ge" or "philips".
        tissue: Tissue codes (see :class:`Tissue`) on the DWI grid.
        flair_labels: Lesion label map on the FLAIR grid.
    """

    dwi: list[Dataset]
    adc: list[Dataset]
    flair: list[Dataset]
    labels: Volume
    lesion_volumes_ml: list[float]
    seed: int
    vendor: str = ""
    tissue: Volume | None = None
    flair_labels: Volume | None = None

    def series(self) -> dict[str, list[Dataset]]:
        """``{"dwi": ..., "adc": ..., "flair": ...}``."""
        return {"dwi": self.dwi, "adc": self.adc, "flair": self.flair}

    def write(self, folder: str | Path) -> dict[str, list[Path]]:
        """Part-10 files under ``folder/<dwi|adc|flair>/``; returns the paths per series."""
        return {name: save_series(Path(folder) / name, datasets) for name, datasets in self.series().items()}


def _make_lesions(head: _Head, rng: np.random.Generator) -> tuple[list[_Lesion], list[float]]:
    count = int(rng.choice([1, 1, 1, 2, 2, 3, 4, 5]))
    lesions: list[_Lesion] = []
    volumes: list[float] = []
    for n in range(count):
        top = 150.0 if count == 1 else (80.0 if n == 0 else 20.0)
        target = float(math.exp(rng.uniform(math.log(0.1), math.log(top))))  # mL, log-uniform
        for _attempt in range(40):
            lesion = _place_lesion(head, rng, target)
            if lesion is None or any(_overlaps(lesion, other) for other in lesions):
                continue
            measured = _lesion_volume_ml(head, lesion)
            if measured <= 0:
                continue
            lesion = lesion.scaled((target / measured) ** (1 / 3), lesion.centres[0])
            measured = _lesion_volume_ml(head, lesion)
            if measured <= 0 or any(_overlaps(lesion, other) for other in lesions):
                continue
            lesions.append(lesion)
            volumes.append(measured)
            break
    return lesions, volumes


def _place_lesion(head: _Head, rng: np.random.Generator, target_ml: float) -> _Lesion | None:
    radius = (3 * target_ml * 1000 / (4 * math.pi)) ** (1 / 3)  # mm, equivalent sphere
    side = 1.0 if rng.random() < 0.5 else -1.0
    if rng.random() < 0.6:  # cortical: towards the convexity, not in the posterior fossa
        u = rng.normal(size=3)
        u[0] = side * (0.4 + abs(u[0]))
        u[2] = abs(u[2]) * 0.8 - 0.15
        u /= np.linalg.norm(u)
        c0, r0 = np.asarray(_CEREBRUM[0]), np.asarray(_CEREBRUM[1])
        frac = max(0.45, 1.0 - (0.55 * radius + 4.0) / 62.0)
        centre = c0 + u * r0 * frac
    else:  # deep: basal ganglia, internal capsule, corona radiata
        centre = np.array([side * rng.uniform(12, 30), rng.uniform(-25, 20), rng.uniform(-2, 32)])
    if head.tissue(centre[None, :].astype(np.float32))[0] not in Tissue.CEREBRUM:
        return None
    m = int(rng.integers(1, 5))
    centres, radii, rots = [centre], [], []
    aniso = rng.uniform(0.7, 1.3, 3)
    radii.append(radius * aniso / np.cbrt(np.prod(aniso)))
    rots.append(_random_rotation(rng))
    for _ in range(m):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        centres.append(centre + u * radius * rng.uniform(0.4, 0.9))
        radii.append(radius * rng.uniform(0.3, 0.6) * rng.uniform(0.7, 1.3, 3))
        rots.append(_random_rotation(rng))
    return _Lesion(np.asarray(centres), np.asarray(radii), np.asarray(rots), side)


def _overlaps(a: _Lesion, b: _Lesion) -> bool:
    (alo, ahi), (blo, bhi) = a.bounds(), b.bounds()
    return bool(np.all(alo < bhi + 2.0) and np.all(blo < ahi + 2.0))


def _lesion_volume_ml(head: _Head, lesion: _Lesion, n: int = 32) -> float:
    """Volume (mL, patient space) of the lesion inside cerebral parenchyma, integrated on an n³ cell grid."""
    lo, hi = lesion.bounds()
    step = (hi - lo) / n
    axes = [lo[i] + step[i] * (np.arange(n) + 0.5) for i in range(3)]
    q = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float32)
    inside = np.flatnonzero(lesion.inside(q))
    if inside.size == 0:
        return 0.0
    tissue = head.tissue(q[inside])
    count = int(np.isin(tissue, Tissue.CEREBRUM).sum())
    return count * float(np.prod(step)) * head.volume_factor / 1000.0


def _lesion_mask(lesions: Sequence[_Lesion], q: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    mask = np.zeros(len(q), dtype=bool)
    for lesion in lesions:
        mask |= lesion.inside(q)
    result: np.ndarray = mask & np.isin(tissue, Tissue.CEREBRUM)
    return result


def _stroke_model(seed: int, vendor: str | None) -> tuple[np.random.Generator, str, _Head, list[_Lesion], list[float]]:
    rng = np.random.default_rng([int(seed), 1])
    vendor = _pick_vendor(vendor, rng)
    head = _Head(rng)
    lesions, volumes = _make_lesions(head, rng)
    return rng, vendor, head, lesions, volumes


def stroke_lesion_volumes(seed: int, *, vendor: str | None = None) -> list[float]:
    """``make_stroke_case(seed, vendor=vendor).lesion_volumes_ml`` without making the images (fast)."""
    return _stroke_model(seed, vendor)[4]


def make_stroke_case(seed: int, *, vendor: str | None = None) -> StrokeCase:
    """A reproducible acute-stroke phantom (DWI b0/b1000, ADC, FLAIR, lesion truth).

    Args:
        seed: Any non-negative int; the same seed (and vendor) gives identical
            pixels, headers and UIDs.
        vendor: "siemens", "ge", "philips", or None to draw one from the seed.
    """
    rng, vendor, head, lesions, volumes = _stroke_model(seed, vendor)
    info = _VENDOR_INFO[vendor]

    study_uid = _uid("stroke", seed, vendor, "study")
    frame_uid = _uid("stroke", seed, vendor, "frame-of-reference")
    patient = _patient_header("stroke", seed, vendor, rng, study_uid)
    study_time = patient["StudyTime"]

    # --- DWI / ADC grid: straight axial, 1.5-2 mm in-plane, 4-5 mm slices (maybe a gap)
    fov = float(rng.choice([220.0, 230.0, 240.0]))
    matrix = int(rng.choice([128, 128, 144]))
    thickness = float(rng.choice([4.0, 5.0]))
    slice_step = thickness + float(rng.choice([0.0, 0.4, 1.0]))
    n_slices = int(np.clip(round(130 / slice_step), 24, 30))
    centre = np.array([rng.uniform(-4, 4), rng.uniform(-2, 8), rng.uniform(0, 8)])
    ps = fov / matrix
    dwi_grid = Grid.centred(centre, (1, 0, 0), (0, 1, 0), (ps, ps, slice_step), (matrix, matrix, n_slices))

    lps, q, tissue = _sample(head, dwi_grid)
    lesion = _lesion_mask(lesions, q, tissue)
    bias = head.bias(q)
    b0_lut = _jitter(
        _lut(
            {
                Tissue.SOFT: 140, Tissue.BONE: 15, Tissue.CSF: 1100, Tissue.GM: 620, Tissue.WM: 520,
                Tissue.DEEP_GM: 580, Tissue.GP: 470, Tissue.CB_GM: 630, Tissue.CB_WM: 520, Tissue.BRAINSTEM: 540,
                Tissue.RN: 450, Tissue.SN: 450, Tissue.DN_LEFT: 460, Tissue.DN_RIGHT: 460,
            }
        ),
        rng,
        0.05,
    )  # fmt: skip
    adc_lut = _jitter(
        _lut(
            {
                Tissue.SOFT: 1300, Tissue.BONE: 600, Tissue.CSF: 3000, Tissue.GM: 850, Tissue.WM: 730,
                Tissue.DEEP_GM: 780, Tissue.GP: 740, Tissue.CB_GM: 820, Tissue.CB_WM: 720, Tissue.BRAINSTEM: 760,
                Tissue.RN: 700, Tissue.SN: 700, Tissue.DN_LEFT: 700, Tissue.DN_RIGHT: 700,
            }
        ),
        rng,
        0.04,
    )  # fmt: skip
    s0 = b0_lut[tissue] * bias
    adc_true = adc_lut[tissue]
    s0[lesion] *= rng.uniform(1.15, 1.35)  # T2 shine-through of the infarct
    adc_true[lesion] = rng.uniform(300, 430)
    s1000 = s0 * np.exp(-adc_true * 1e-3)
    shape = dwi_grid.shape
    sigma = float(rng.uniform(7, 13))
    b0 = _rician(_psf(s0.reshape(shape), 0.4), sigma, rng)
    b1000 = _rician(_psf(s1000.reshape(shape), 0.4), sigma, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(b0, 1e-3) / np.maximum(b1000, 1e-3)) * 1000.0
    adc = np.where(b0 > 6 * sigma, np.clip(adc, 0, 4000), 0.0)

    dwi_uid = _uid(study_uid, "dwi")
    adc_uid = _uid(study_uid, "adc")
    flair_uid = _uid(study_uid, "flair")
    common: dict[str, Any] = {"ScanningSequence": "EP", "SequenceVariant": ["SK", "SP"], "ScanOptions": ["PFP", "FS"]}
    common |= {"MRAcquisitionType": "2D", "RepetitionTime": 5200.0, "EchoTime": 73.0, "FlipAngle": 90.0}
    common |= {"NumberOfAverages": 1.0, "EchoTrainLength": 1, "SliceThickness": thickness}
    common |= {"WindowCenter": 400, "WindowWidth": 800}
    dwi_header = {**patient, **common, **_series_header(info["dwi"], 5, 0, study_time)}
    dwi_header["ImagesInAcquisition"] = 2 * n_slices
    if vendor == "siemens":
        dwi_types = [["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE", "ND", "NORM"]] * 2
        dwi_types[1] = ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND", "NORM"]
    elif vendor == "ge":
        dwi_types = [["ORIGINAL", "PRIMARY", "OTHER"]] * 2
    else:
        dwi_types = [["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"], ["DERIVED", "PRIMARY", "DIFFUSION", "ISOTROPIC"]]
    block_headers = [
        {"DiffusionBValue": 0.0, "DiffusionDirectionality": "NONE", "ImageType": dwi_types[0]},
        {"DiffusionBValue": 1000.0, "DiffusionDirectionality": "ISOTROPIC", "ImageType": dwi_types[1]},
    ]
    if vendor == "siemens":
        block_headers[0]["SequenceName"] = "*ep_b0"
        block_headers[1]["SequenceName"] = "*ep_b1000t"

    def decorate_dwi(ds: Dataset, block: int, _slice: int) -> None:
        b = (0, 1000)[block]
        if vendor == "siemens":
            priv = ds.private_block(0x0019, _SIEMENS_CREATOR, create=True)
            priv.add_new(0x0C, "IS", b)
            priv.add_new(0x0D, "CS", "NONE" if b == 0 else "DIRECTIONAL")
        elif vendor == "ge":
            priv = ds.private_block(0x0043, _GE_CREATOR, create=True)
            priv.add_new(0x39, "IS", [b, 8, 0, 0])
        else:
            priv = ds.private_block(0x2001, _PHILIPS_CREATOR, create=True)
            priv.add_new(0x03, "FL", float(b))
            priv.add_new(0x04, "CS", "I" if b else "")

    dwi = write_series(
        dwi_grid,
        [b0, b1000],
        header=dwi_header,
        study_uid=study_uid,
        series_uid=dwi_uid,
        frame_of_reference_uid=frame_uid,
        block_headers=block_headers,
        decorate=decorate_dwi,
    )
    adc_header = {**patient, **common, **_series_header(info["adc"], 6, 1, study_time)}
    adc_header["ImageType"] = {
        "siemens": ["DERIVED", "PRIMARY", "ADC", "DIFFUSION", "ND", "NORM"],
        "ge": ["DERIVED", "PRIMARY", "ADC", "OTHER"],
        "philips": ["DERIVED", "PRIMARY", "ADC", "ADC"],
    }[vendor]
    adc_header |= {"WindowCenter": 1000, "WindowWidth": 2000, "DerivationDescription": "ADC from b=0, 1000 trace"}
    if vendor == "siemens":
        adc_header["SequenceName"] = "*ep_b0_1000"
    adc_series = write_series(
        dwi_grid,
        [adc],
        header=adc_header,
        study_uid=study_uid,
        series_uid=adc_uid,
        frame_of_reference_uid=frame_uid,
    )

    # --- FLAIR: oblique axial (Siemens, GE) or sagittal (Philips), other resolution and thickness
    f_matrix = int(rng.choice([160, 176]))
    f_fov = float(rng.choice([220.0, 230.0, 240.0]))
    f_thick = float(rng.choice([5.0, 6.0])) if vendor != "philips" else 4.0
    f_step = f_thick + float(rng.choice([0.5, 1.0, 1.5]))
    f_ps = f_fov / f_matrix
    f_centre = centre + rng.uniform(-3, 3, 3)
    if vendor == "philips":
        n_f = int(np.clip(round(150 / f_step), 22, 30))
        tilt = math.radians(rng.uniform(-6, 6))
        row_dir = (0.0, math.cos(tilt), math.sin(tilt))  # anterior -> posterior
        col_dir = (0.0, math.sin(tilt), -math.cos(tilt))  # head -> feet
    else:
        n_f = int(np.clip(round(135 / f_step), 20, 26))
        tilt = math.radians(rng.uniform(8, 18) * (1 if rng.random() < 0.5 else -1))
        row_dir = (1.0, 0.0, 0.0)
        col_dir = (0.0, math.cos(tilt), math.sin(tilt))
    flair_grid = Grid.centred(f_centre, row_dir, col_dir, (f_ps, f_ps, f_step), (f_matrix, f_matrix, n_f))
    f_lps, f_q, f_tissue = _sample(head, flair_grid)
    f_lesion = _lesion_mask(lesions, f_q, f_tissue)
    flair_lut = _jitter(
        _lut(
            {
                Tissue.SOFT: 420, Tissue.BONE: 15, Tissue.CSF: 45, Tissue.GM: 440, Tissue.WM: 330,
                Tissue.DEEP_GM: 400, Tissue.GP: 340, Tissue.CB_GM: 430, Tissue.CB_WM: 330, Tissue.BRAINSTEM: 370,
                Tissue.RN: 300, Tissue.SN: 300, Tissue.DN_LEFT: 310, Tissue.DN_RIGHT: 310,
            }
        ),
        rng,
        0.05,
    )  # fmt: skip
    f_signal = flair_lut[f_tissue]
    f_signal[f_lesion] *= rng.uniform(1.25, 1.6)
    f_signal *= head.bias(f_q) ** 1.3
    flair = _rician(_psf(f_signal.reshape(flair_grid.shape)), float(rng.uniform(6, 12)), rng)
    flair_header = {**patient, **_series_header(info["flair"], 3, -240, study_time)}
    flair_header |= {"ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"], "ScanOptions": "IR"}
    flair_header |= {"MRAcquisitionType": "2D", "RepetitionTime": 9000.0, "EchoTime": 81.0, "InversionTime": 2500.0}
    flair_header |= {"FlipAngle": 150.0, "EchoTrainLength": 16, "SliceThickness": f_thick}
    flair_header |= {"WindowCenter": 350, "WindowWidth": 700}
    if vendor == "siemens":
        flair_header["SequenceName"] = "*tir2d1_16"
    flair_series = write_series(
        flair_grid,
        [flair],
        header=flair_header,
        study_uid=study_uid,
        series_uid=flair_uid,
        frame_of_reference_uid=frame_uid,
    )

    labels = dwi_grid.volume(
        lesion.reshape(shape).astype(np.uint8), series_uid=dwi_uid, frame_of_reference_uid=frame_uid
    )
    return StrokeCase(
        dwi=dwi,
        adc=adc_series,
        flair=flair_series,
        labels=labels,
        lesion_volumes_ml=volumes,
        seed=int(seed),
        vendor=vendor,
        tissue=dwi_grid.volume(tissue.reshape(shape), series_uid=dwi_uid, frame_of_reference_uid=frame_uid),
        flair_labels=flair_grid.volume(
            f_lesion.reshape(flair_grid.shape).astype(np.uint8), series_uid=flair_uid, frame_of_reference_uid=frame_uid
        ),
    )


# --------------------------------------------------------------------------- QSM

#: QSM storage: int16 with this RescaleSlope (ppb per stored unit); covers +-3276 ppb at 0.1 ppb steps.
QSM_SLOPE = 0.1


@dataclass(eq=False)
class QsmCase:
    """One QSM phantom.

    Attributes:
        qsm: The QSM series, susceptibility in ppb (int16 x RescaleSlope 0.1).
        labels: uint8 on the QSM grid: 1 = left dentate nucleus (patient +x), 2 = right.
        seed: The seed that reproduces the case.
        vendor: "siemens", "ge" or "philips".
        tissue: Tissue codes (see :class:`Tissue`) on the QSM grid (distractors included).
        coverage: "whole-brain" or "posterior-fossa".
    """

    qsm: list[Dataset]
    labels: Volume
    seed: int
    vendor: str = ""
    tissue: Volume | None = None
    coverage: str = ""

    def series(self) -> dict[str, list[Dataset]]:
        """``{"qsm": ...}``."""
        return {"qsm": self.qsm}

    def write(self, folder: str | Path) -> dict[str, list[Path]]:
        """Part-10 files under ``folder/qsm/``; returns the paths per series."""
        return {name: save_series(Path(folder) / name, datasets) for name, datasets in self.series().items()}


def make_qsm_case(seed: int, *, vendor: str | None = None) -> QsmCase:
    """A reproducible QSM phantom with dentate-nucleus truth (1 = left, 2 = right) and iron-rich distractors.

    Args:
        seed: Any non-negative int; the same seed (and vendor) gives identical pixels and UIDs.
        vendor: "siemens", "ge", "philips", or None to draw one from the seed.
    """
    rng = np.random.default_rng([int(seed), 2])
    vendor = _pick_vendor(vendor, rng)
    info = _VENDOR_INFO[vendor]
    head = _Head(rng)
    study_uid = _uid("qsm", seed, vendor, "study")
    frame_uid = _uid("qsm", seed, vendor, "frame-of-reference")
    patient = _patient_header("qsm", seed, vendor, rng, study_uid)

    tilt = math.radians(rng.uniform(-8, 8))
    row_dir = (1.0, 0.0, 0.0)
    col_dir = (0.0, math.cos(tilt), math.sin(tilt))
    if rng.random() < 0.5:
        coverage = "whole-brain"
        ps = float(rng.choice([1.25, 1.4]))
        matrix = 144 if ps == 1.4 else 160
        step = float(rng.choice([2.0, 2.5]))
        n = int(np.clip(round(rng.uniform(120, 135) / step), 48, 60))
        centre = np.array([rng.uniform(-3, 3), rng.uniform(-2, 6), rng.uniform(-8, 2)])
    else:
        coverage = "posterior-fossa"
        ps = float(rng.choice([0.9, 1.0]))
        matrix = 160
        step = float(rng.choice([1.5, 2.0]))
        n = int(rng.integers(32, 41))
        centre = np.array([rng.uniform(-3, 3), rng.uniform(15, 25), rng.uniform(-36, -26)])
    grid = Grid.centred(centre, row_dir, col_dir, (ps, ps, step), (matrix, matrix, n))
    _lps, q, tissue = _sample(head, grid)
    chi = {
        Tissue.CSF: 0.0, Tissue.GM: 15.0, Tissue.WM: -25.0, Tissue.DEEP_GM: 45.0, Tissue.GP: rng.uniform(120, 170),
        Tissue.CB_GM: 10.0, Tissue.CB_WM: -20.0, Tissue.BRAINSTEM: -15.0, Tissue.RN: rng.uniform(100, 140),
        Tissue.SN: rng.uniform(110, 160), Tissue.DN_LEFT: rng.uniform(100, 150), Tissue.DN_RIGHT: rng.uniform(100, 150),
    }  # fmt: skip
    table = _lut({k: float(v) for k, v in chi.items()})
    shape = grid.shape
    values = table[tissue]
    qs = q / 100.0
    values += 4.0 * np.sin(2.1 * qs[:, 0] + 1.3 * qs[:, 1] + rng.uniform(0, 6)) * np.cos(1.7 * qs[:, 2])
    brain = tissue >= Tissue.CSF
    values = _psf(np.where(brain, values, 0.0).reshape(shape), 0.5)
    values = values + rng.normal(0.0, rng.uniform(5, 9), shape)
    values = np.where(brain.reshape(shape), values, 0.0)

    series_uid = _uid(study_uid, "qsm")
    header = {**patient, **_series_header(info["qsm"], 12, 600, patient["StudyTime"])}
    header |= {"ImageType": ["DERIVED", "PRIMARY", "QSM", "ND"], "ScanningSequence": "GR", "SequenceVariant": "SP"}
    header |= {"MRAcquisitionType": "3D", "RepetitionTime": 35.0, "EchoTime": 20.0, "FlipAngle": 15.0}
    header |= {"WindowCenter": 50, "WindowWidth": 400, "SliceThickness": step, "RescaleType": "PPB"}
    header["DerivationDescription"] = "Quantitative susceptibility map, ppb, CSF referenced"
    datasets = write_series(
        grid,
        [values],
        header=header,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_uid,
        signed=True,
        slope=QSM_SLOPE,
    )
    label = np.zeros(len(tissue), dtype=np.uint8)
    label[tissue == Tissue.DN_LEFT] = 1
    label[tissue == Tissue.DN_RIGHT] = 2
    return QsmCase(
        qsm=datasets,
        labels=grid.volume(label.reshape(shape), series_uid=series_uid, frame_of_reference_uid=frame_uid),
        seed=int(seed),
        vendor=vendor,
        tissue=grid.volume(tissue.reshape(shape), series_uid=series_uid, frame_of_reference_uid=frame_uid),
        coverage=coverage,
    )
