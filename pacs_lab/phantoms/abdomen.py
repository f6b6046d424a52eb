"""Seeded abdomen phantoms (CT and fat-suppressed T2-weighted MR) with kidney ground truth.

A continuous anatomical model in DICOM patient space (LPS, mm: +x patient left,
+y posterior, +z head) is sampled on an oriented voxel grid and written as a
single-frame DICOM series with realistic headers. The same seed always gives the
same pixels, headers and UIDs; different seeds give different anatomy, grid,
vendor and (in about 40 % of cases) a renal tumour.

Anatomy: body ellipse with subcutaneous fat, abdominal wall, paraspinal and psoas
muscles, a vertebra (body, canal, posterior elements, discs), aorta and IVC,
liver (patient right, -x), spleen (patient left, +x), bowel loops with mesenteric
fat and gas, perirenal fat, and two obliquely oriented kidneys (left at +x,
right at -x and 1-2 cm lower), each with cortex, medulla (pyramids), and a renal
sinus (sinus fat + collecting system) that opens at the hilum.

Ground truth (all :class:`~inference.volume.Volume` objects on the series grid,
uint8, the grid :func:`~inference.volume.volume_from_datasets` builds):

* ``labels``: 0 = background, 1 = **right** kidney (patient right, -x),
  2 = **left** kidney (patient left, +x). A kidney label is the whole kidney:
  parenchyma + renal sinus (fat and collecting system) + a tumour that arises
  from it (KiTS-style "kidney" = kidney incl. tumour).
* ``parenchyma``: 1 = renal parenchyma (cortex + medulla) of either kidney; the
  sinus and the tumour are excluded. ``parenchyma`` is a subset of ``labels > 0``.
* ``tumour_mask``: 1 = renal tumour (sphere-ish, 1-6 cm diameter) or ``None``
  when the case has none; it lies inside the kidney label of its side.
* ``tissues``: the tissue class of every voxel (see :data:`TISSUES`), for tests
  and intensity checks.

CT: portal-venous phase, HU stored as int16 with RescaleIntercept -1024, slope 1,
about 12 HU noise. MR: single-shot fat-suppressed T2 (HASTE/SSFSE/SPAIR), axial or
coronal, uint16 arbitrary units with a smooth bias field and Rician noise.

Nothing here imports ``pacs_node`` or ``storage``; the small series writer is private.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from scipy import ndimage

from inference.volume import Volume
from pacs_lab.phantoms.brain import save_series

__all__ = [
    "CT_HU",
    "LEFT_KIDNEY",
    "MR_T2FS",
    "RIGHT_KIDNEY",
    "TISSUES",
    "UID_ROOT",
    "VENDORS",
    "AbdomenCase",
    "make_ct_case",
    "make_mr_case",
]

UID_ROOT = "1.2.826.0.1.3680043.10.1453."

RIGHT_KIDNEY = 1
LEFT_KIDNEY = 2

VENDORS = ("siemens", "ge", "philips")

#: Tissue class names by value of :attr:`AbdomenCase.tissues`.
TISSUES: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "muscle",
    3: "bone",
    4: "disc",
    5: "csf",
    6: "aorta",
    7: "ivc",
    8: "liver",
    9: "spleen",
    10: "bowel",
    11: "mesenteric_fat",
    12: "gas",
    13: "perirenal_fat",
    14: "cortex",
    15: "medulla",
    16: "sinus_fat",
    17: "collecting_system",
    18: "tumour",
}
_T = {name: value for value, name in TISSUES.items()}

#: Design CT values (HU, portal-venous phase) per tissue name.
CT_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "bone": 700.0,
    "disc": 80.0,
    "csf": 10.0,
    "aorta": 160.0,
    "ivc": 130.0,
    "liver": 110.0,
    "spleen": 120.0,
    "bowel": 40.0,
    "mesenteric_fat": -90.0,
    "gas": -900.0,
    "perirenal_fat": -100.0,
    "cortex": 180.0,
    "medulla": 150.0,
    "sinus_fat": -80.0,
    "collecting_system": 10.0,
    "tumour": 80.0,
}

#: Design fat-suppressed T2 signal (arbitrary units before gain and bias) per tissue name.
MR_T2FS: dict[str, float] = {
    "air": 0.0,
    "fat": 45.0,
    "muscle": 120.0,
    "bone": 90.0,
    "disc": 320.0,
    "csf": 950.0,
    "aorta": 30.0,  # flow void
    "ivc": 70.0,
    "liver": 190.0,
    "spleen": 380.0,
    "bowel": 300.0,
    "mesenteric_fat": 45.0,
    "gas": 0.0,
    "perirenal_fat": 40.0,
    "cortex": 430.0,
    "medulla": 500.0,
    "sinus_fat": 50.0,
    "collecting_system": 900.0,
    "tumour": 350.0,
}

_VENDOR_INFO: dict[str, dict[str, Any]] = {
    "siemens": {
        "manufacturer": "SIEMENS",
        "ct_model": "SOMATOM Definition AS+",
        "mr_model": "MAGNETOM Aera",
        "kernel": "B30f",
        "ct_name": "Abdomen {t:.1f} B30f PV",
        "mr_name": {"axial": "t2_haste_fs_tra", "coronal": "t2_haste_fs_cor"},
        "contrast": "Ultravist 370",
        "mr_image_type": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
        "sequence_name": "*haste2d1",
        "field": 1.5,
    },
    "ge": {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "ct_model": "Revolution CT",
        "mr_model": "DISCOVERY MR750w",
        "kernel": "STANDARD",
        "ct_name": "PORTAL VENOUS {t:g}mm",
        "mr_name": {"axial": "Ax T2 SSFSE FS", "coronal": "Cor T2 SSFSE FS"},
        "contrast": "OMNIPAQUE 350",
        "mr_image_type": ["ORIGINAL", "PRIMARY", "OTHER"],
        "sequence_name": "ssfse",
        "field": 3.0,
    },
    "philips": {
        "manufacturer": "Philips",
        "ct_model": "iCT 256",
        "mr_model": "Ingenia",
        "kernel": "B",
        "ct_name": "Venous Phase {t:g} Br40",
        "mr_name": {"axial": "T2W_SPAIR", "coronal": "T2W_SPAIR_COR"},
        "contrast": "Iopromide 300",
        "mr_image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        "sequence_name": "TSE",
        "field": 1.5,
    },
}

_ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


# --------------------------------------------------------------------------- case


@dataclass(frozen=True, eq=False)
class AbdomenCase:
    """One phantom case: a DICOM series and its ground truth on the series grid.

    Attributes:
        series: Single-frame instances, in increasing position along the slice normal.
        labels: 1 = right kidney, 2 = left kidney (whole kidney incl. sinus and tumour).
        seed: The seed the case was made from.
        modality: "CT" or "MR".
        tumour: Whether the case has a renal tumour.
        parenchyma: 1 = renal parenchyma (cortex + medulla) of either kidney.
        tumour_mask: 1 = tumour, or ``None`` when ``tumour`` is False.
        tissues: Tissue class per voxel (:data:`TISSUES`).
        vendor: "siemens", "ge" or "philips".
        orientation: "axial" or "coronal".
        tumour_side: ``RIGHT_KIDNEY`` / ``LEFT_KIDNEY`` for the kidney with the tumour, else 0.
    """

    series: list[Dataset]
    labels: Volume
    seed: int
    modality: str
    tumour: bool
    parenchyma: Volume | None = None
    tumour_mask: Volume | None = None
    tissues: Volume | None = None
    vendor: str = ""
    orientation: str = "axial"
    tumour_side: int = 0

    def write(self, folder: str | Path) -> list[Path]:
        """Write the series as Part 10 files ``<SOPInstanceUID>.dcm`` into ``folder`` (created)."""

        return save_series(folder, self.series)


# --------------------------------------------------------------------------- anatomy


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v / np.linalg.norm(v), dtype=np.float64)


@dataclass(frozen=True)
class _Kidney:
    side: int  # +1 left (+x), -1 right
    centre: np.ndarray
    axes: np.ndarray  # rows: hilum direction, thickness direction, long axis (unit vectors)
    semi: np.ndarray  # semi-axes along those rows (mm)
    pyramids: int
    phase: float


@dataclass(frozen=True)
class _Tumour:
    side: int
    centre: np.ndarray
    radius: float
    bumps: np.ndarray  # (3, 3) smooth shape modulation coefficients


@dataclass(frozen=True)
class _Anatomy:
    body: tuple[float, float]  # semi-axes x, y
    fat: float
    wall: float
    spine_y: float
    vb_radius: float
    aorta: tuple[float, float, float]  # x, y, r
    ivc: tuple[float, float, float, float]  # x, y, rx, ry
    liver_c: np.ndarray
    liver_s: np.ndarray
    spleen_c: np.ndarray
    spleen_s: np.ndarray
    kidneys: tuple[_Kidney, _Kidney]
    tumour: _Tumour | None
    disc_period: float
    disc_phase: float
    waves: np.ndarray  # (8, 4): kx, ky, kz, phase for bowel texture
    tex: np.ndarray  # (4, 4): organ texture waves
    offset: np.ndarray  # anatomy -> scanner translation (LPS mm)


def _kidney(rng: np.random.Generator, side: int, centre: np.ndarray) -> _Kidney:
    a_cor = math.radians(rng.uniform(10, 20))  # upper pole medial
    a_sag = math.radians(rng.uniform(8, 18))  # upper pole posterior
    long_axis = _unit(np.array([-side * math.sin(a_cor), math.sin(a_sag), 1.0]))
    phi = math.radians(rng.uniform(20, 40))  # hilum faces antero-medially
    hilum = np.array([-side * math.cos(phi), -math.sin(phi), 0.0])
    hilum = _unit(hilum - hilum.dot(long_axis) * long_axis)
    thick = np.cross(long_axis, hilum)
    semi = np.array([rng.uniform(27, 32), rng.uniform(20, 24), rng.uniform(50, 58)])
    return _Kidney(
        side, centre, np.stack([hilum, thick, long_axis]), semi, int(rng.integers(6, 9)), rng.uniform(0, 6.3)
    )


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    bx, by = rng.uniform(140, 165), rng.uniform(100, 120)
    spine_y = by - rng.uniform(50, 58)
    vb = rng.uniform(18, 22)
    ky = spine_y - rng.uniform(5, 15)
    drop = rng.uniform(10, 20)  # right kidney lower
    left = _kidney(rng, +1, np.array([rng.uniform(60, 70), ky + rng.uniform(-4, 4), drop / 2]))
    right = _kidney(rng, -1, np.array([-rng.uniform(60, 70), ky + rng.uniform(-4, 4), -drop / 2]))
    tumour = None
    if rng.random() < 0.4:
        kid = left if rng.random() < 0.5 else right
        d = rng.normal(size=3)
        d[0] = -abs(d[0]) * 0.5  # away from the hilum, mostly lateral/polar
        d = _unit(d)
        rho = rng.uniform(0.5, 0.9)
        centre = kid.centre + kid.axes.T @ (d * rho * kid.semi)
        radius = rng.uniform(5.0, 30.0)
        tumour = _Tumour(kid.side, centre, radius, rng.uniform(-0.1, 0.1, size=(3, 3)))
    k = rng.normal(size=(8, 3))
    k = k / np.linalg.norm(k, axis=1, keepdims=True) * (2 * math.pi / rng.uniform(25, 45, size=(8, 1)))
    waves = np.concatenate([k, rng.uniform(0, 2 * math.pi, size=(8, 1))], axis=1)
    kt = rng.normal(size=(4, 3))
    kt = kt / np.linalg.norm(kt, axis=1, keepdims=True) * (2 * math.pi / rng.uniform(8, 20, size=(4, 1)))
    tex = np.concatenate([kt, rng.uniform(0, 2 * math.pi, size=(4, 1))], axis=1)
    return _Anatomy(
        body=(bx, by),
        fat=rng.uniform(12, 30),
        wall=rng.uniform(8, 12),
        spine_y=spine_y,
        vb_radius=vb,
        aorta=(rng.uniform(14, 20), spine_y - vb - rng.uniform(10, 14), rng.uniform(10, 13)),
        ivc=(-rng.uniform(22, 28), spine_y - vb - rng.uniform(8, 12), rng.uniform(12, 15), rng.uniform(8, 10)),
        liver_c=np.array([-0.45 * bx, -0.1 * by + rng.uniform(-5, 5), rng.uniform(60, 80)]),
        liver_s=np.array([0.55 * bx, 0.75 * by, rng.uniform(100, 120)]),
        spleen_c=np.array([0.6 * bx, 0.35 * by, rng.uniform(50, 65)]),
        spleen_s=np.array([rng.uniform(28, 34), rng.uniform(40, 50), rng.uniform(50, 60)]),
        kidneys=(right, left),
        tumour=tumour,
        disc_period=rng.uniform(32, 38),
        disc_phase=rng.uniform(0, 40),
        waves=waves,
        tex=tex,
        offset=np.array([rng.uniform(-10, 10), rng.uniform(-20, 10), rng.uniform(-300, -100)]),
    )


def _wave_sum(waves: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for kx, ky, kz, ph in waves:
        out += np.sin(np.float32(kx) * x + np.float32(ky) * y + np.float32(kz) * z + np.float32(ph))
    return out / np.float32(math.sqrt(len(waves) / 2))


@dataclass
class _Model:
    tissue: np.ndarray
    labels: np.ndarray
    parenchyma: np.ndarray
    tumour: np.ndarray | None
    texture: np.ndarray  # smooth zero-mean texture on soft tissue (0 elsewhere)
    tumour_texture: np.ndarray  # coarser zero-mean heterogeneity inside the tumour (0 elsewhere)


def _box(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray, half: float) -> np.ndarray:
    """Flat indices of the points within ``half`` mm of ``centre`` along each axis."""
    f = np.float32
    inside = np.abs(x - f(centre[0])) < f(half)
    inside &= np.abs(y - f(centre[1])) < f(half)
    inside &= np.abs(z - f(centre[2])) < f(half)
    return np.flatnonzero(inside)


def _evaluate(an: _Anatomy, x3: np.ndarray, y3: np.ndarray, z3: np.ndarray) -> _Model:
    """Tissue classes and labels at anatomy-space points (float32 arrays of one shape).

    Works on flat arrays; organ-local details are computed on bounding-box subsets only.
    """
    f = np.float32
    shape = x3.shape
    x, y, z = x3.ravel(), y3.ravel(), z3.ravel()
    t = np.zeros(x.shape, dtype=np.uint8)
    bx, by = an.body
    in_body = (x / f(bx)) ** 2 + (y / f(by)) ** 2 <= 1
    t[in_body] = _T["fat"]
    ix, iy = bx - an.fat, by - an.fat
    t[(x / f(ix)) ** 2 + (y / f(iy)) ** 2 <= 1] = _T["muscle"]
    cx, cy = ix - an.wall, iy - an.wall
    cavity = (x / f(cx)) ** 2 + (y / f(cy)) ** 2 <= 1
    ic = np.flatnonzero(cavity)
    xc, yc, zc = x[ic], y[ic], z[ic]
    bowel = np.abs(_wave_sum(an.waves[:4], xc, yc, zc)) < 0.45
    t[ic] = _T["mesenteric_fat"]
    ib = ic[bowel]
    t[ib] = _T["bowel"]
    gas = _wave_sum(an.waves[4:], xc[bowel], yc[bowel], zc[bowel]) > 1.3
    t[ib[gas]] = _T["gas"]

    def ellipsoid(c: np.ndarray, s: np.ndarray) -> np.ndarray:
        return ((xc - f(c[0])) / f(s[0])) ** 2 + ((yc - f(c[1])) / f(s[1])) ** 2 + ((zc - f(c[2])) / f(s[2])) ** 2

    liver = (ellipsoid(an.liver_c, an.liver_s) <= 1) & (xc < f(0.25 * bx) - f(0.3) * (yc + f(by)))
    t[ic[liver]] = _T["liver"]
    t[ic[ellipsoid(an.spleen_c, an.spleen_s) <= 1]] = _T["spleen"]

    # kidneys: local coordinates on a box around each kidney
    locals_: list[tuple[np.ndarray, list[np.ndarray], np.ndarray]] = []
    for kid in an.kidneys:
        ik = _box(x, y, z, kid.centre, float(kid.semi.max()) + 16)
        dx, dy, dz = x[ik] - f(kid.centre[0]), y[ik] - f(kid.centre[1]), z[ik] - f(kid.centre[2])
        u = [f(ax[0]) * dx + f(ax[1]) * dy + f(ax[2]) * dz for ax in kid.axes]
        r2 = (u[0] / f(kid.semi[0])) ** 2 + (u[1] / f(kid.semi[1])) ** 2 + (u[2] / f(kid.semi[2])) ** 2
        peri = (u[0] / f(kid.semi[0] + 12)) ** 2 + (u[1] / f(kid.semi[1] + 12)) ** 2 + (u[2] / f(kid.semi[2] + 15)) ** 2
        t[ik[(peri <= 1) & in_body[ik]]] = _T["perirenal_fat"]
        locals_.append((ik, u, r2))

    # vessels, psoas, spine, paraspinal muscles
    ax_, ay_, ar_ = an.aorta
    t[(x - f(ax_)) ** 2 + (y - f(ay_)) ** 2 <= f(ar_**2)] = _T["aorta"]
    vx, vy, vrx, vry = an.ivc
    t[((x - f(vx)) / f(vrx)) ** 2 + ((y - f(vy)) / f(vry)) ** 2 <= 1] = _T["ivc"]
    psoas_r2 = np.clip(f(12) + (f(40) - z) * f(0.08), 8, 26) ** 2
    for s in (-1, 1):
        px = s * (an.vb_radius + 12)
        t[((x - f(px)) ** 2 + (y - f(an.spine_y)) ** 2) <= psoas_r2] = _T["muscle"]
        para = ((x - f(s * 32)) / f(24)) ** 2 + ((y - f(an.spine_y + an.vb_radius + 28)) / f(20)) ** 2 <= 1
        t[para & in_body] = _T["muscle"]
    sy, vb = an.spine_y, an.vb_radius
    canal_y = sy + vb + 9
    isp = np.flatnonzero((np.abs(x) < f(vb + 1)) & (y > f(sy - vb - 1)) & (y < f(canal_y + 36)))
    xs, ys, zs = x[isp], y[isp], z[isp]
    body_vb = xs**2 + (ys - f(sy)) ** 2 <= f(vb**2)
    disc = np.abs(((zs - f(an.disc_phase)) % f(an.disc_period)) - f(an.disc_period / 2)) < 4.5
    ring = xs**2 + (ys - f(canal_y)) ** 2
    spinous = (np.abs(xs) < 5) & (ys > f(canal_y + 10)) & (ys < f(canal_y + 35)) & ~disc
    spinous &= (xs / f(ix)) ** 2 + (ys / f(iy - 8)) ** 2 <= 1
    t[isp[body_vb]] = _T["bone"]
    t[isp[body_vb & disc]] = _T["disc"]
    t[isp[(ring <= f(15**2)) & ~disc]] = _T["bone"]
    t[isp[ring <= f(8**2)]] = _T["csf"]
    t[isp[spinous]] = _T["bone"]

    labels = np.zeros(x.shape, dtype=np.uint8)
    parenchyma = np.zeros(x.shape, dtype=bool)
    for kid, (ik, (u0, u1, u2), r2) in zip(an.kidneys, locals_, strict=True):
        kidney = r2 <= 1
        sinus = kidney & (
            ((u0 - f(0.4 * kid.semi[0])) / f(0.65 * kid.semi[0])) ** 2
            + (u1 / f(0.55 * kid.semi[1])) ** 2
            + (u2 / f(0.6 * kid.semi[2])) ** 2
            <= 1
        )
        collecting = sinus & (
            ((u0 - f(0.5 * kid.semi[0])) / f(0.35 * kid.semi[0])) ** 2
            + (u1 / f(0.25 * kid.semi[1])) ** 2
            + (u2 / f(0.4 * kid.semi[2])) ** 2
            <= 1
        )
        theta = np.arctan2(u2 / f(kid.semi[2]), u1 / f(kid.semi[1]))
        medulla_edge = f(0.68) + f(0.1) * np.cos(f(kid.pyramids) * theta + f(kid.phase))
        par = kidney & ~sinus
        t[ik[par]] = _T["cortex"]
        t[ik[par & (np.sqrt(r2) < medulla_edge)]] = _T["medulla"]
        t[ik[sinus]] = _T["sinus_fat"]
        t[ik[collecting]] = _T["collecting_system"]
        labels[ik[kidney]] = RIGHT_KIDNEY if kid.side < 0 else LEFT_KIDNEY
        parenchyma[ik[par]] = True

    tumour = None
    tumour_texture = np.zeros(x.shape, dtype=np.float32)
    if an.tumour is not None:
        tu = an.tumour
        it = _box(x, y, z, tu.centre, tu.radius * 1.4 + 1)
        dx, dy, dz = x[it] - f(tu.centre[0]), y[it] - f(tu.centre[1]), z[it] - f(tu.centre[2])
        dist = np.sqrt(dx * dx + dy * dy + dz * dz)
        inv = f(1) / np.maximum(dist, f(1e-3))
        nx, ny, nz = dx * inv, dy * inv, dz * inv
        b = tu.bumps
        mod = f(1) + f(b[0, 0]) * nx * ny + f(b[0, 1]) * ny * nz + f(b[0, 2]) * nx * nz
        mod += f(b[1, 0]) * (nx * nx - ny * ny) + f(b[1, 1]) * (ny * ny - nz * nz) + f(b[1, 2]) * nx
        inside = (dist <= f(tu.radius) * mod) & in_body[it]
        sel = it[inside]
        tumour = np.zeros(x.shape, dtype=bool)
        tumour[sel] = True
        t[sel] = _T["tumour"]
        labels[sel] = RIGHT_KIDNEY if tu.side < 0 else LEFT_KIDNEY
        parenchyma[sel] = False
        tumour_texture[sel] = _wave_sum(an.waves[:4], x[sel], y[sel], z[sel])
    texture = np.zeros(x.shape, dtype=np.float32)
    isoft = np.flatnonzero((t >= _T["liver"]) & (t != _T["gas"]))
    texture[isoft] = _wave_sum(an.tex, x[isoft], y[isoft], z[isoft])
    return _Model(
        t.reshape(shape),
        labels.reshape(shape),
        parenchyma.reshape(shape),
        None if tumour is None else tumour.reshape(shape),
        texture.reshape(shape),
        tumour_texture.reshape(shape),
    )


# --------------------------------------------------------------------------- grid + writer


@dataclass(frozen=True)
class _Grid:
    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    spacing: tuple[float, float, float]  # column, row, slice
    shape: tuple[int, int, int]  # slices, rows, cols

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        i = (np.arange(nx) * sx)[None, None, :, None] * self.row_dir
        j = (np.arange(ny) * sy)[None, :, None, None] * self.col_dir
        k = (np.arange(nz) * sz)[:, None, None, None] * self.normal
        out = []
        for a in range(3):
            out.append((self.origin[a] + k[..., a] + j[..., a] + i[..., a]).astype(np.float32))
        return out[0], out[1], out[2]


def _make_grid(
    orientation: str, centre: np.ndarray, rows: int, cols: int, slices: int, spacing: tuple[float, float, float]
) -> _Grid:
    row_dir = np.array(_ORIENTATIONS[orientation][0])
    col_dir = np.array(_ORIENTATIONS[orientation][1])
    normal = np.cross(row_dir, col_dir)
    sx, sy, sz = spacing
    origin = centre - row_dir * sx * (cols - 1) / 2 - col_dir * sy * (rows - 1) / 2 - normal * sz * (slices - 1) / 2
    return _Grid(np.round(origin, 3), row_dir, col_dir, normal, spacing, (slices, rows, cols))


def _uid(seed: int, modality: str, *parts: object) -> str:
    return str(
        generate_uid(prefix=UID_ROOT, entropy_srcs=["pacs-node-phantom-abdomen", modality, str(seed), *map(str, parts)])
    )


def _series(
    seed: int,
    modality: str,
    grid: _Grid,
    pixels: np.ndarray,
    header: dict[str, Any],
    date: str,
) -> list[Dataset]:
    """Single-frame instances from a (slices, rows, cols) int16/uint16 array on ``grid``."""
    study_uid = _uid(seed, modality, "study")
    series_uid = _uid(seed, modality, "series")
    for_uid = _uid(seed, modality, "frame-of-reference")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    slices, rows, cols = grid.shape
    sx, sy, sz = grid.spacing
    out = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        sop_uid = _uid(seed, modality, "instance", k)
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = "093000"
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "094112"
        ds.AccessionNumber = f"PHA{seed:07d}"[-16:]
        ds.Modality = modality
        ds.ReferringPhysicianName = ""
        ds.PatientName = f"PHANTOM^ABDOMEN^{seed}"
        ds.PatientID = f"PHABD{seed:06d}"[-64:]
        ds.PatientBirthDate = ""
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = str(seed % 100000)
        ds.SeriesNumber = 3 if modality == "CT" else 5
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        pos = grid.origin + grid.normal * sz * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [float(v) for v in (*grid.row_dir, *grid.col_dir)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(float(pos @ grid.normal), 4)
        ds.PixelSpacing = [sy, sx]
        ds.SliceThickness = sz
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        for key, value in header.items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        out.append(ds)
    return out


def _volumes(grid: _Grid, series: list[Dataset], arrays: list[np.ndarray]) -> list[Volume]:
    direction = np.stack([grid.row_dir, grid.col_dir, grid.normal], axis=1)
    uids = tuple(str(ds.SOPInstanceUID) for ds in series)
    return [
        Volume(
            array=np.ascontiguousarray(a.astype(np.uint8)),
            origin=np.array(series[0].ImagePositionPatient, dtype=np.float64),
            spacing=grid.spacing,
            direction=direction,
            sop_uids=uids,
            series_uid=str(series[0].SeriesInstanceUID),
            frame_of_reference_uid=str(series[0].FrameOfReferenceUID),
        )
        for a in arrays
    ]


def _pick_vendor(rng: np.random.Generator, vendor: str | None) -> str:
    chosen = VENDORS[int(rng.integers(len(VENDORS)))]
    if vendor is None:
        return chosen
    key = vendor.strip().lower()
    if key.startswith("ge"):
        key = "ge"
    if key not in _VENDOR_INFO:
        raise ValueError(f"unknown vendor {vendor!r}; use one of {', '.join(VENDORS)}")
    return key


def _date(rng: np.random.Generator) -> str:
    day = datetime.date(2025, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 600)))
    return day.strftime("%Y%m%d")


def _patient(rng: np.random.Generator) -> dict[str, Any]:
    return {
        "PatientSex": "M" if rng.random() < 0.5 else "F",
        "PatientAge": f"{int(rng.integers(25, 85)):03d}Y",
        "PatientWeight": round(float(rng.uniform(55, 100)), 1),
        "BodyPartExamined": "ABDOMEN",
    }


def _case(
    seed: int,
    modality: str,
    grid: _Grid,
    an: _Anatomy,
    image: Any,
    header: dict[str, Any],
    date: str,
    vendor: str,
    orientation: str,
) -> AbdomenCase:
    x, y, z = grid.points()
    off = an.offset.astype(np.float32)
    model = _evaluate(an, x - off[0], y - off[1], z - off[2])
    pixels = image(model, x, y, z)
    series = _series(seed, modality, grid, pixels, header, date)
    arrays = [model.labels, model.parenchyma, model.tissue]
    if model.tumour is not None:
        arrays.append(model.tumour)
    vols = _volumes(grid, series, arrays)
    return AbdomenCase(
        series=series,
        labels=vols[0],
        seed=seed,
        modality=modality,
        tumour=model.tumour is not None,
        parenchyma=vols[1],
        tumour_mask=vols[3] if model.tumour is not None else None,
        tissues=vols[2],
        vendor=vendor,
        orientation=orientation,
        tumour_side=0 if an.tumour is None else (RIGHT_KIDNEY if an.tumour.side < 0 else LEFT_KIDNEY),
    )


# --------------------------------------------------------------------------- public


def make_ct_case(seed: int, *, vendor: str | None = None) -> AbdomenCase:
    """A portal-venous abdomen CT (HU as int16, intercept -1024) with kidney ground truth.

    About 256x256 pixels of 1.4-1.6 mm, 2.5-5 mm slices covering both kidneys.

    Args:
        seed: Any non-negative integer; the same seed gives the same bytes and UIDs.
        vendor: "siemens", "ge" or "philips" (series naming and headers); seeded if None.

    Raises:
        ValueError: For an unknown vendor.
    """
    rng = np.random.default_rng([int(seed), 1])
    vendor = _pick_vendor(rng, vendor)
    info = _VENDOR_INFO[vendor]
    an = _anatomy(rng)
    px = round(float(rng.uniform(1.4, 1.6)), 3)
    thickness = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
    slices = max(40, min(64, math.ceil(155 / thickness)))
    kz = (an.kidneys[0].centre[2] + an.kidneys[1].centre[2]) / 2
    centre = an.offset + np.array([0.0, rng.uniform(-10, 10), kz + rng.uniform(-3, 3)])
    grid = _make_grid("axial", centre, 256, 256, slices, (px, px, thickness))
    offsets = {name: float(rng.uniform(-8, 8)) for name in CT_HU}
    noise_seed = int(rng.integers(2**31))
    date = _date(rng)
    patient = _patient(rng)

    def image(model: _Model, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        lut = np.array([CT_HU[TISSUES[i]] + offsets[TISSUES[i]] for i in range(len(TISSUES))], dtype=np.float32)
        hu = lut[model.tissue]
        hu += np.float32(5) * model.texture + np.float32(22) * model.tumour_texture
        hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.6, 0.6), mode="nearest")
        noise = np.random.default_rng(noise_seed).standard_normal(hu.shape, dtype=np.float32)
        hu += np.float32(12) * noise
        return np.clip(np.rint(hu + 1024), 0, 4095).astype(np.int16)

    header = {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "Manufacturer": info["manufacturer"],
        "ManufacturerModelName": info["ct_model"],
        "InstitutionName": "Phantom Hospital",
        "StationName": "PHANTOMCT",
        "StudyDescription": "CT ABDOMEN WITH CONTRAST",
        "SeriesDescription": info["ct_name"].format(t=thickness),
        "ProtocolName": "Abdomen PV",
        "PatientPosition": "FFS",
        "KVP": 120,
        "XRayTubeCurrent": int(rng.integers(150, 350)),
        "ExposureTime": 500,
        "ConvolutionKernel": info["kernel"],
        "ReconstructionDiameter": round(256 * px, 1),
        "ContrastBolusAgent": info["contrast"],
        "ContrastBolusRoute": "IV",
        "ContrastBolusVolume": 100,
        "ContrastBolusStartTime": "094002",
        "RescaleIntercept": -1024,
        "RescaleSlope": 1,
        "RescaleType": "HU",
        "WindowCenter": 40,
        "WindowWidth": 400,
        **patient,
    }
    return _case(seed, "CT", grid, an, image, header, date, vendor, "axial")


def make_mr_case(seed: int, *, vendor: str | None = None, orientation: str | None = None) -> AbdomenCase:
    """A fat-suppressed T2-weighted abdomen MR (axial or coronal, seeded) with kidney ground truth.

    About 256x256 pixels of 1.2-1.6 mm, 4-6 mm slices, a smooth bias field and Rician noise.

    Args:
        seed: Any non-negative integer; the same seed gives the same bytes and UIDs.
        vendor: "siemens", "ge" or "philips"; seeded if None.
        orientation: "axial" or "coronal"; seeded if None.

    Raises:
        ValueError: For an unknown vendor or orientation.
    """
    rng = np.random.default_rng([int(seed), 2])
    vendor = _pick_vendor(rng, vendor)
    info = _VENDOR_INFO[vendor]
    seeded_orientation = "coronal" if rng.random() < 0.5 else "axial"
    orientation = seeded_orientation if orientation is None else orientation
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; use 'axial' or 'coronal'")
    an = _anatomy(rng)
    px = round(float(rng.uniform(1.2, 1.6)), 3)
    thickness = float(rng.choice([4.0, 5.0, 6.0]))
    kz = (an.kidneys[0].centre[2] + an.kidneys[1].centre[2]) / 2
    if orientation == "axial":
        slices = math.ceil(160 / thickness)
        centre = an.offset + np.array([0.0, rng.uniform(-10, 10), kz + rng.uniform(-3, 3)])
    else:
        slices = math.ceil(155 / thickness)
        centre = an.offset + np.array([0.0, 20 + rng.uniform(-5, 5), kz + rng.uniform(-10, 10)])
    grid = _make_grid(orientation, centre, 256, 256, slices, (px, px, thickness))
    gain = float(rng.uniform(0.8, 1.3))
    grad = rng.normal(size=3)
    grad = grad / np.linalg.norm(grad) * rng.uniform(0.06, 0.12)
    curv = float(rng.uniform(0.03, 0.08))
    noise_seed = int(rng.integers(2**31))
    date = _date(rng)
    patient = _patient(rng)

    def image(model: _Model, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        lut = np.array([MR_T2FS[TISSUES[i]] for i in range(len(TISSUES))], dtype=np.float32)
        sig = lut[model.tissue]
        sig *= np.float32(1) + np.float32(0.04) * model.texture + np.float32(0.25) * model.tumour_texture
        sig = ndimage.gaussian_filter(sig, sigma=(0.3, 0.6, 0.6), mode="nearest")
        cx, cy, cz = (float(v) for v in centre)
        dx, dy, dz = (x - np.float32(cx)) / 150, (y - np.float32(cy)) / 150, (z - np.float32(cz)) / 150
        bias = 1 + np.float32(grad[0]) * dx + np.float32(grad[1]) * dy + np.float32(grad[2]) * dz
        bias -= np.float32(curv) * (dx * dx + dy * dy + dz * dz)
        sig *= np.float32(gain) * bias
        g = np.random.default_rng(noise_seed)
        sigma = np.float32(12 * gain)
        n1 = g.standard_normal(sig.shape, dtype=np.float32)
        n2 = g.standard_normal(sig.shape, dtype=np.float32)
        mag = np.sqrt((sig + sigma * n1) ** 2 + (sigma * n2) ** 2)
        return np.clip(np.rint(mag), 0, 4095).astype(np.uint16)

    fs = info["field"]
    header = {
        "ImageType": info["mr_image_type"],
        "Manufacturer": info["manufacturer"] if vendor != "philips" else "Philips Medical Systems",
        "ManufacturerModelName": info["mr_model"],
        "InstitutionName": "Phantom Hospital",
        "StationName": "PHANTOMMR",
        "StudyDescription": "MR ABDOMEN KIDNEYS",
        "SeriesDescription": info["mr_name"][orientation],
        "ProtocolName": info["mr_name"][orientation],
        "PatientPosition": "HFS",
        "ScanningSequence": "SE",
        "SequenceVariant": ["SK", "SS"],
        "ScanOptions": ["FS"] if vendor != "philips" else ["FS", "SPAIR"],
        "MRAcquisitionType": "2D",
        "SequenceName": info["sequence_name"],
        "MagneticFieldStrength": fs,
        "ImagingFrequency": round(42.577478 * fs, 6),
        "ImagedNucleus": "1H",
        "RepetitionTime": round(float(rng.uniform(1000, 1600)), 1),
        "EchoTime": round(float(rng.uniform(85, 100)), 1),
        "EchoTrainLength": 128,
        "FlipAngle": 150 if vendor == "siemens" else 90,
        "SpacingBetweenSlices": thickness,
        "WindowCenter": int(500 * gain),
        "WindowWidth": int(1000 * gain),
        **patient,
    }
    return _case(seed, "MR", grid, an, image, header, date, vendor, orientation)
