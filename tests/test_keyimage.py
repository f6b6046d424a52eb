"""The burned-in key image: slice choice, radiological orientation, colours, banner,
the Secondary Capture (round-tripped through bytes and checked by dciodvfy) and the PNG."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from inference.errors import GeometryError
from inference.manifest import Manifest
from inference.outputs.common import DEMO_WARNING, MANUFACTURER, ResultIdentity
from inference.outputs.keyimage import (
    BANNER_COLOR,
    KeyImage,
    build_key_image_sc,
    choose_key_slices,
    compose_key_image,
    png_bytes,
    render_key_image,
)
from inference.volume import Volume, volume_from_datasets
from pacs_lab.synthetic import make_oriented_series
from tests.conftest import dciodvfy

RED = (255, 0, 0)
BLUE = (0, 0, 255)

MANIFEST: dict[str, Any] = {
    "name": "test-spheres",
    "version": "1.0.0",
    "intended_use": "tests only",
    "demo": True,
    "inputs": [{"role": "image"}],
    "reference": "image",
    "labels": {
        1: {
            "name": "Left sphere",
            "type": {"value": "27925004", "meaning": "Nodule"},
            "laterality": "left",
            "color": list(RED),
            "measure_mean_of": ["image"],
            "mean_unit": "[ppb]",
        },
        2: {
            "name": "Right sphere",
            "type": {"value": "27925004", "meaning": "Nodule"},
            "laterality": "right",
            "color": list(BLUE),
            "count_components": True,
        },
    },
    "stages": [
        {
            "name": "spheres",
            "label_map": {1: 1, 2: 2},
            "model": {
                "backend": "native",
                "network": "DynUNet",
                "network_args": {},
                "weights": "weights.safetensors",
                "spacing": [2.0, 2.0, 2.0],
                "patch_size": [16, 16, 16],
            },
        }
    ],
}


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest.model_validate(MANIFEST)


def spheres(
    left: tuple[float, float, float] = (20.0, 0.0, 0.0), right: tuple[float, float, float] | None = None
) -> Any:
    """A body-like ellipsoid (100) with a bright sphere (300) at ``left`` and a dimmer one (200) at ``right``."""

    def values(points: np.ndarray) -> np.ndarray:
        out = np.where(np.linalg.norm(points / np.array([40.0, 40.0, 60.0]), axis=1) <= 1, 100.0, 5.0)
        out = np.where(np.linalg.norm(points - np.array(left), axis=1) <= 9.0, 300.0, out)
        if right is not None:
            out = np.where(np.linalg.norm(points - np.array(right), axis=1) <= 6.0, 200.0, out)
        return out

    return values


def label_of(volume: Volume) -> Volume:
    arr = np.zeros(volume.shape, dtype=np.uint8)
    arr[volume.array >= 250] = 1
    arr[(volume.array >= 150) & (volume.array < 250)] = 2
    return volume.with_array(arr)


def metrics_of(labels: Volume) -> dict[str, Any]:
    ml = labels.voxel_volume_ml
    n1, n2 = int((labels.array == 1).sum()), int((labels.array == 2).sum())
    return {
        "voxel_volume_ml": ml,
        "labels": {
            "1": {
                "name": "Left sphere",
                "voxels": n1,
                "volume_ml": n1 * ml,
                "mean": {"image": 300.0},
                "mean_unit": "[ppb]",
            },
            "2": {"name": "Right sphere", "voxels": n2, "volume_ml": n2 * ml, "count": 1 if n2 else 0},
        },
    }


def near(rgb: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return np.all(np.abs(rgb.astype(np.int16) - np.array(color, dtype=np.int16)) <= tol, axis=-1)


def panel_columns(key: KeyImage, color: tuple[int, int, int]) -> list[np.ndarray]:
    """Per panel, the x positions (relative to the panel's width, 0..1) of pixels in ``color``."""
    out = []
    for left, top, right, bottom in key.boxes:
        _, xs = np.nonzero(near(key.rgb[top:bottom, left:right], color))
        out.append(xs / (right - left))
    return out


def compose(series: list[pydicom.Dataset], manifest: Manifest, **kw: Any) -> tuple[Volume, Volume, KeyImage]:
    volume = volume_from_datasets(series)
    labels = label_of(volume)
    key = compose_key_image(volume, labels, manifest, metrics_of(labels), title="AI spheres: test-spheres 1.0.0", **kw)
    return volume, labels, key


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("orientation", "flip_rows", "plane", "expected"),
    [
        ("axial", False, "axial", ("L", "P")),
        ("axial", True, "axial", ("L", "P")),
        ("coronal", False, "coronal", ("L", "F")),
        ("coronal", True, "coronal", ("L", "F")),
    ],
)
def test_patient_left_is_on_the_image_right(
    manifest: Manifest, orientation: str, flip_rows: bool, plane: str, expected: tuple[str, str]
) -> None:
    series = make_oriented_series(
        spheres(right=(-20.0, 0.0, 0.0)), orientation=orientation, flip_rows=flip_rows, slices=16
    )
    _, _, key = compose(series, manifest, demo=False)
    assert key.plane == plane
    assert key.patient_orientation == expected
    for reds, blues in zip(panel_columns(key, RED), panel_columns(key, BLUE), strict=True):
        assert reds.size > 50, "the left sphere's outline is missing from a panel"
        assert np.all(reds > 0.5), "the patient's LEFT sphere must be drawn in the image's right half"
        if blues.size:
            assert np.all(blues < 0.5), "the patient's RIGHT sphere must be drawn in the image's left half"


def panel_rows(key: KeyImage, color: tuple[int, int, int]) -> list[np.ndarray]:
    """Per panel, the y positions (relative to the panel's height, 0..1) of pixels in ``color``."""
    out = []
    for left, top, right, bottom in key.boxes:
        ys, _ = np.nonzero(near(key.rgb[top:bottom, left:right], color))
        out.append(ys / (bottom - top))
    return out


def rows_reversed(volume: Volume) -> Volume:
    """The same voxels in patient space, stored with the row order reversed."""
    rows = volume.shape[1]
    direction = volume.direction.copy()
    direction[:, 1] *= -1
    return replace(
        volume,
        array=volume.array[:, ::-1, :].copy(),
        origin=volume.index_to_lps((0, rows - 1, 0)),
        direction=direction,
    )


def transposed(volume: Volume) -> Volume:
    """The same voxels in patient space, stored with rows and columns swapped."""
    direction = volume.direction[:, [1, 0, 2]]
    sx, sy, sz = volume.spacing
    return replace(volume, array=volume.array.transpose(0, 2, 1).copy(), direction=direction, spacing=(sy, sx, sz))


@pytest.mark.parametrize("storage", ["as acquired", "rows reversed", "transposed", "both"])
def test_axial_display_ignores_array_order(manifest: Manifest, storage: str) -> None:
    # left sphere (red) on the patient's left, right one (blue) anterior: expect red right, blue top
    series = make_oriented_series(
        spheres(left=(20.0, 14.0, 0.0), right=(-6.0, -20.0, 0.0)), spacing=(2.0, 1.5, 3.0), slices=16
    )
    volume = volume_from_datasets(series)
    if storage in ("rows reversed", "both"):
        volume = rows_reversed(volume)
    if storage in ("transposed", "both"):
        volume = transposed(volume)
    labels = label_of(volume)
    key = compose_key_image(volume, labels, manifest, metrics_of(labels), title="t", demo=False)
    assert key.patient_orientation == ("L", "P")
    left, top, right, bottom = key.boxes[0]
    assert (bottom - top) / (right - left) == pytest.approx(48 * 1.5 / (48 * 2.0), rel=0.03)
    for reds, blues in zip(panel_columns(key, RED), panel_columns(key, BLUE), strict=True):
        assert reds.size and np.all(reds > 0.5)
        if blues.size:
            assert np.all(blues < 0.5)
    for reds, blues in zip(panel_rows(key, RED), panel_rows(key, BLUE), strict=True):
        assert np.all(reds > 0.5), "a posterior-ish sphere must be in the lower half"
        if blues.size:
            assert np.all(blues < 0.5), "the anterior sphere must be in the upper half"
    assert any(b.size for b in panel_rows(key, BLUE))


def test_sagittal_shows_anterior_on_the_left(manifest: Manifest) -> None:
    # A sphere anterior (-y in LPS) of the centre; the sagittal plane through x=0 cuts it.
    series = make_oriented_series(spheres(left=(0.0, -20.0, 0.0)), orientation="sagittal", slices=16)
    _, _, key = compose(series, manifest, demo=False)
    assert key.plane == "sagittal"
    assert key.patient_orientation == ("P", "F")
    for reds in panel_columns(key, RED):
        assert reds.size > 20 and np.all(reds < 0.5)


def test_non_square_pixels_are_shown_square(manifest: Manifest) -> None:
    # columns 1 mm apart, rows 2 mm apart: the 48 x 48 matrix covers 48 mm x 96 mm
    series = make_oriented_series(spheres(), orientation="coronal", spacing=(1.0, 2.0, 3.0), slices=12)
    _, _, key = compose(series, manifest, demo=False)
    left, top, right, bottom = key.boxes[0]
    assert (bottom - top) / (right - left) == pytest.approx(2.0, rel=0.03)


# --------------------------------------------------------------------------- content


def test_size_colours_legend_and_banner(manifest: Manifest) -> None:
    series = make_oriented_series(spheres(right=(-20.0, 0.0, 0.0)), slices=16)
    volume, labels, key = compose(series, manifest, demo=True)
    rgb = key.rgb
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert 1024 <= rgb.shape[1] <= 1536 and 400 <= rgb.shape[0] <= 1200
    assert len(key.boxes) == 3 and key.findings
    for color in (RED, BLUE):
        assert near(rgb, color, tol=10).sum() > 100, f"label colour {color} is missing"
    # the demo banner: a full-width strip of banner colour at the top and at the bottom
    for strip in (rgb[5:30], rgb[-30:-5]):
        assert near(strip, BANNER_COLOR, tol=10).mean() > 0.6
    plain = render_key_image(volume, labels, manifest, metrics_of(labels), title="t", demo=False)
    assert near(plain, BANNER_COLOR, tol=10).sum() == 0
    assert plain.shape[1] == rgb.shape[1] and plain.shape[0] < rgb.shape[0]
    # deterministic
    again = render_key_image(
        volume, labels, manifest, metrics_of(labels), title="AI spheres: test-spheres 1.0.0", demo=True
    )
    assert np.array_equal(again, rgb)


def test_chosen_slices_are_the_most_labelled(manifest: Manifest) -> None:
    series = make_oriented_series(spheres(), slices=20)
    volume = volume_from_datasets(series)
    arr = np.zeros(volume.shape, dtype=np.uint8)
    for k, half in ((2, 4), (5, 2), (9, 8), (13, 3), (17, 6)):  # squares of (2 * half)^2 voxels
        arr[k, 24 - half : 24 + half, 30 - half : 30 + half] = 1
    counts = np.count_nonzero(arr.reshape(arr.shape[0], -1), axis=1)
    top3 = set(np.argsort(counts)[::-1][:3].tolist())
    assert top3 == {2, 9, 17}
    key = compose_key_image(volume, volume.with_array(arr), manifest, {}, title="t", demo=False)
    assert set(key.slices) == top3
    # axial panels run head first
    z = [volume.index_to_lps((0, 0, k))[2] for k in key.slices]
    assert z == sorted(z, reverse=True)
    assert [uid for uid, _ in key.references] == [volume.sop_uids[k] for k in key.slices]


def test_slices_are_spread_and_every_label_is_shown() -> None:
    arr = np.zeros((30, 20, 20), dtype=np.uint8)
    for k in range(5, 25):  # one thick lesion, largest in the middle
        half = 8 - abs(k - 15) // 2
        arr[k, 10 - half : 10 + half, 10 - half : 10 + half] = 1
    arr[6, 1:3, 1:3] = 2  # a small second label on a slice with little of the first
    chosen, findings = choose_key_slices(arr)
    assert findings and len(chosen) == 3
    assert chosen[0] == 14  # the largest slice (first of the tied ones)
    assert 6 in chosen  # label 2 is shown
    arr[6, 1:3, 1:3] = 0
    chosen, _ = choose_key_slices(arr)
    gaps = np.diff(sorted(chosen))
    assert np.all(gaps >= 5), f"slices {chosen} are not spread over the lesion"


def test_empty_labels_render_no_findings(manifest: Manifest) -> None:
    series = make_oriented_series(spheres(), slices=20)
    volume = volume_from_datasets(series)
    empty = volume.with_array(np.zeros(volume.shape, dtype=np.uint8))
    key = compose_key_image(volume, empty, manifest, {}, title="t", demo=False)
    assert not key.findings
    assert len(key.slices) == 3 and len(set(key.slices)) == 3
    assert min(key.slices) >= 4 and max(key.slices) <= 15  # central
    for left, top, right, bottom in key.boxes:
        panel = key.rgb[top:bottom, left:right]
        assert near(panel, RED, tol=40).sum() == 0 and near(panel, BLUE, tol=40).sum() == 0
    assert choose_key_slices(np.zeros((2, 4, 4), dtype=np.uint8)) == ([0, 1], False)


def test_ct_values_get_a_soft_tissue_window(manifest: Manifest) -> None:
    series = make_oriented_series(spheres(), slices=8, modality="CT")
    volume = volume_from_datasets(series)
    hu = np.full(volume.shape, -1000.0, dtype=np.float32)
    hu[:, 8:40, 8:40] = 40.0  # soft tissue: the window's centre
    hu[:, 20:28, 30:38] = 1000.0  # bone: white
    ct = volume.with_array(hu)
    key = compose_key_image(ct, ct.with_array(np.zeros(ct.shape, np.uint8)), manifest, {}, title="t", demo=False)
    left, top, right, bottom = key.boxes[0]
    panel = key.rgb[top:bottom, left:right].astype(int)
    h, w = panel.shape[:2]
    assert abs(panel[h * 3 // 4, w // 2, 0] - 128) <= 3  # 40 HU -> mid grey
    assert panel[2, w // 2, 0] == 0  # air -> black
    assert panel[h * 24 // 48, w * 34 // 48, 0] == 255  # bone -> white


def test_labels_off_the_grid_are_refused(manifest: Manifest) -> None:
    volume = volume_from_datasets(make_oriented_series(spheres(), slices=8))
    other = volume_from_datasets(make_oriented_series(spheres(), slices=8, center=(5.0, 0.0, 0.0)))
    with pytest.raises(GeometryError, match="grid"):
        compose_key_image(
            volume, other.with_array(np.zeros(other.shape, np.uint8)), manifest, {}, title="t", demo=False
        )


# --------------------------------------------------------------------------- outputs


def roundtrip(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue())
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_secondary_capture_roundtrip_and_validity(manifest: Manifest, tmp_path: Path) -> None:
    series = make_oriented_series(
        spheres(right=(-20.0, 0.0, 0.0)), slices=16, SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Jürgen"
    )
    _, _, key = compose(series, manifest, demo=True)
    identity = ResultIdentity.of((ds.SOPInstanceUID for ds in series), "spheres", manifest.name, manifest.version)
    sc = build_key_image_sc(key, series, identity, pipeline="spheres", manifest=manifest, node_version="0.9.0")
    back = roundtrip(sc, tmp_path / "sc.dcm")
    dciodvfy(tmp_path / "sc.dcm")

    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.PhotometricInterpretation == "RGB" and back.SamplesPerPixel == 3 and back.BitsAllocated == 8
    assert np.array_equal(back.pixel_array, key.rgb)
    assert back.BurnedInAnnotation == "YES"
    assert back.Manufacturer == MANUFACTURER
    assert list(back.SoftwareVersions) == ["pacs-node 0.9.0", "test-spheres 1.0.0"]
    assert back.SeriesDescription == "AI spheres key image"
    assert DEMO_WARNING in back.ImageComments and DEMO_WARNING in back.DerivationDescription
    assert "test-spheres 1.0.0" in back.DerivationDescription
    assert back.StudyInstanceUID == series[0].StudyInstanceUID
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "Müller^Jürgen"
    assert back.SeriesNumber == 9003
    assert back.SeriesInstanceUID == identity.series_uid("SC")
    assert back.SOPInstanceUID == identity.instance_uid("SC")
    assert list(back.PatientOrientation) == ["L", "P"]
    shown = [item.ReferencedSOPInstanceUID for item in back.SourceImageSequence]
    assert shown == [uid for uid, _ in key.references] and len(shown) == 3
    (ref_series,) = back.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == series[0].SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence] == shown

    # deterministic UIDs: the same inputs give the same object identity, a new model version a new one
    again = build_key_image_sc(key, series, identity, pipeline="spheres", manifest=manifest, node_version="0.9.0")
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sc.SeriesInstanceUID, sc.SOPInstanceUID)
    newer = ResultIdentity.of((ds.SOPInstanceUID for ds in series), "spheres", manifest.name, "1.0.1")
    assert newer.instance_uid("SC") != sc.SOPInstanceUID


def test_secondary_capture_from_plain_pixels(manifest: Manifest, tmp_path: Path) -> None:
    series = make_oriented_series(spheres(), slices=6)
    volume = volume_from_datasets(series)
    labels = label_of(volume)
    rgb = render_key_image(volume, labels, manifest, metrics_of(labels), title="t", demo=False)
    identity = ResultIdentity.of((ds.SOPInstanceUID for ds in series), "spheres", manifest.name, manifest.version)
    plain = manifest.model_copy(update={"demo": False})
    sc = build_key_image_sc(rgb, series, identity, pipeline="spheres", manifest=plain, node_version="0.9.0")
    back = roundtrip(sc, tmp_path / "sc.dcm")
    dciodvfy(tmp_path / "sc.dcm")
    assert np.array_equal(back.pixel_array, rgb)
    assert DEMO_WARNING not in back.ImageComments
    assert len(back.SourceImageSequence) == len(series)  # no slice information: every source
    with pytest.raises(ValueError, match="source"):
        build_key_image_sc(rgb, [], identity, pipeline="spheres", manifest=plain, node_version="0.9.0")
    with pytest.raises(ValueError, match="uint8"):
        build_key_image_sc(rgb[..., 0], series, identity, pipeline="spheres", manifest=plain, node_version="0.9.0")


def test_png_decodes_to_the_same_pixels(manifest: Manifest) -> None:
    series = make_oriented_series(spheres(right=(-20.0, 0.0, 0.0)), slices=10)
    _, _, key = compose(series, manifest, demo=True)
    data = png_bytes(key)
    assert data.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), key.rgb)
    assert png_bytes(key.rgb) == data
