"""The burned-in key image: three slices with the overlay, a legend, a DICOM Secondary Capture and a PNG.

For the many PACS viewers that cannot draw a SEG, the node renders the
segmentation into pixels: the three most informative slices of the reference
series (the ones with the largest labelled area, spread out, every label shown
at least once), each windowed for its modality and shown in radiological
convention (the patient's left on the image's right), with every label's outline
and a light fill in its manifest colour, and below them a legend with each
label's volume (mean value and lesion count where the model reports them), the
title, and for demo models a "DEMO MODEL - NOT FOR CLINICAL USE" banner.

Plain functions on plain data:

* :func:`compose_key_image` -> :class:`KeyImage` (pixels plus what they show:
  slice indices, panel boxes, source SOP references, patient orientation);
* :func:`render_key_image` -> the (H, W, 3) uint8 pixels only;
* :func:`build_key_image_sc` -> a Secondary Capture that joins the source study;
* :func:`png_bytes` -> a PNG for the dashboard.

Geometry never assumes array order: each slice is re-oriented from the volume's
direction matrix, and non-square pixels are resampled so that the displayed
pixels are square. No patient identifiers are burned into the pixels.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from inference.errors import GeometryError
from inference.manifest import Manifest
from inference.outputs.common import (
    DEMO_WARNING,
    MANUFACTURER,
    ResultIdentity,
    copy_study_attributes,
    software_versions,
)
from inference.segments import Segment, build_segments, display_labels
from inference.volume import Volume

__all__ = [
    "BANNER_COLOR",
    "KeyImage",
    "build_key_image_sc",
    "choose_key_slices",
    "compose_key_image",
    "png_bytes",
    "render_key_image",
]

logger = logging.getLogger(__name__)

#: Total width of the rendered key image in pixels.
WIDTH = 1200
#: Background of the demo banners (white text on it).
BANNER_COLOR = (190, 20, 20)
#: Colour of the QC warnings in the legend.
QC_COLOR = (255, 170, 0)
#: Colour of labels that the manifest does not list.
UNLISTED_COLOR = (255, 255, 0)
#: Soft-tissue window (centre, width) used when the values look like Hounsfield units.
CT_WINDOW = (40.0, 400.0)
#: Opacity of the translucent fill inside each label.
FILL_ALPHA = 0.3

_MARGIN = 16
_GAP = 12
_SLOTS = 3
_BACKGROUND = (0, 0, 0)
_TEXT = (235, 235, 235)
_MUTED = (150, 150, 150)
_OUTLINE_PX = 2

# Display targets (LPS unit vectors) per plane: rightwards on screen, downwards on screen.
# Radiological convention: axial and coronal show the patient's left on the right,
# axial has anterior at the top, coronal/sagittal have the head at the top, sagittal
# has anterior on the left.
_LPS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))  # (negative, positive) along x, y, z
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}
_PLANE_OF_AXIS = ("sagittal", "coronal", "axial")  # the plane whose normal is along LPS x, y, z


# --------------------------------------------------------------------------- result type


@dataclass(frozen=True, eq=False)
class KeyImage:
    """A rendered key image and what it shows.

    Attributes:
        rgb: The pixels, (H, W, 3) uint8.
        slices: Slice indices (``z`` of the volume) shown, panel by panel from left to right.
        boxes: Per panel, the ``(left, top, right, bottom)`` pixel box (right and
            bottom exclusive) that the slice's image occupies in ``rgb``.
        references: Per panel, ``(SOP Instance UID, frame number or None)`` of the
            source image the slice comes from (empty when the volume has no SOP UIDs).
        patient_orientation: Patient directions along the panels' rows and columns
            (``("L", "P")`` for an axial series in radiological convention).
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (the nearest plane of the slices).
        findings: Whether any voxel was labelled.
    """

    rgb: np.ndarray
    slices: tuple[int, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    references: tuple[tuple[str, int | None], ...]
    patient_orientation: tuple[str, str]
    plane: str
    findings: bool


@dataclass(frozen=True)
class _View:
    """How a slice ``array[k]`` (rows along y, columns along x) is shown on screen."""

    transpose: bool
    flip_h: bool
    flip_v: bool
    spacing_h: float  # mm per source pixel along the screen's horizontal
    spacing_v: float
    right: np.ndarray  # LPS direction of screen-right
    down: np.ndarray  # LPS direction of screen-down
    plane: str

    def apply(self, slice2d: np.ndarray) -> np.ndarray:
        out = slice2d.T if self.transpose else slice2d
        if self.flip_h:
            out = out[:, ::-1]
        if self.flip_v:
            out = out[::-1, :]
        return np.ascontiguousarray(out)


# --------------------------------------------------------------------------- geometry helpers


def _letter(vector: np.ndarray) -> str:
    """The patient direction letter (L/R, A/P, H/F) nearest to an LPS vector."""
    axis = int(np.argmax(np.abs(vector)))
    return _LPS_LETTERS[axis][1 if vector[axis] > 0 else 0]


def _view(volume: Volume) -> _View:
    """Transpose/flips that bring the volume's slices closest to radiological display."""
    direction = volume.direction
    dx, dy, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    plane = _PLANE_OF_AXIS[int(np.argmax(np.abs(normal)))]
    right_t, down_t = (np.array(v) for v in _PLANES[plane])
    straight = abs(dx @ right_t) + abs(dy @ down_t)
    swapped = abs(dy @ right_t) + abs(dx @ down_t)
    transpose = swapped > straight + 1e-9
    h_vec, v_vec = (dy, dx) if transpose else (dx, dy)
    sx, sy, _ = volume.spacing
    spacing_h, spacing_v = (sy, sx) if transpose else (sx, sy)
    flip_h = bool(h_vec @ right_t < 0)
    flip_v = bool(v_vec @ down_t < 0)
    return _View(
        transpose=bool(transpose),
        flip_h=flip_h,
        flip_v=flip_v,
        spacing_h=spacing_h,
        spacing_v=spacing_v,
        right=-h_vec if flip_h else h_vec,
        down=-v_vec if flip_v else v_vec,
        plane=plane,
    )


def _display_order(volume: Volume, slices: Sequence[int], plane: str) -> list[int]:
    """Slices ordered head first (axial), anterior first (coronal) or right first (sagittal)."""
    _, rows, cols = volume.shape
    centres = volume.index_to_lps(np.array([((cols - 1) / 2, (rows - 1) / 2, k) for k in slices], dtype=float))
    if plane == "axial":
        keys = -centres[:, 2]
    elif plane == "coronal":
        keys = centres[:, 1]
    else:
        keys = centres[:, 0]
    return [k for _, k in sorted(zip(keys.tolist(), slices, strict=True))]


# --------------------------------------------------------------------------- slice choice


def _label_counts(labels: np.ndarray) -> np.ndarray:
    """Voxels per label value; bincount is a linear pass where np.unique sorts (seconds on a CT)."""
    flat = np.asarray(labels).ravel()
    if flat.dtype.kind == "u" or (flat.dtype.kind == "i" and flat.size and int(flat.min()) >= 0):
        return np.bincount(flat)
    values, counts = np.unique(flat, return_counts=True)
    out = np.zeros(int(values.max()) + 1 if values.size else 1, dtype=np.int64)
    out[values.astype(np.int64)] = counts
    return out


def choose_key_slices(labels: np.ndarray, n: int = 3) -> tuple[list[int], bool]:
    """The ``n`` most informative slice indices of a label map ``[z, y, x]``, and whether any voxel is labelled.

    The slice with the largest labelled area comes first; then, for every label
    not yet visible, that label's largest slice; then further large slices at
    least ``extent / (n + 1)`` slices away from those already chosen (``extent``:
    the labelled slab's thickness in slices), then any other labelled slice. Only
    labelled slices are chosen, so fewer than ``n`` come back when fewer are
    labelled. With nothing labelled: ``n`` evenly spaced central slices.

    Raises:
        ValueError: If ``labels`` is not 3-D or ``n`` < 1.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3-D [z, y, x] array; got shape {labels.shape}")
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    nz = labels.shape[0]
    n = min(n, nz)
    flat = labels.reshape(nz, -1)
    counts = np.count_nonzero(flat, axis=1)
    if not counts.any():
        if n == nz:
            return list(range(nz)), False
        picks = sorted({int(round((nz - 1) * f)) for f in np.linspace(0.3, 0.7, n)})
        return picks, False
    labelled = np.flatnonzero(counts)
    extent = int(labelled[-1] - labelled[0] + 1)
    gap = max(1, extent // (n + 1))
    order = sorted(labelled.tolist(), key=lambda k: (-int(counts[k]), k))
    chosen: list[int] = [order[0]]
    values = [int(v) for v in np.flatnonzero(_label_counts(flat[labelled])) if v != 0]
    for value in values:
        if len(chosen) >= n:
            break
        per_slice = np.count_nonzero(flat == value, axis=1)
        if any(per_slice[k] for k in chosen):
            continue
        chosen.append(int(np.argmax(per_slice)))
    for k in order:
        if len(chosen) >= n:
            break
        if all(abs(k - c) >= gap for c in chosen):
            chosen.append(k)
    for k in order:
        if len(chosen) >= n:
            break
        if k not in chosen:
            chosen.append(k)
    return chosen, True


# --------------------------------------------------------------------------- pixels


def _window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """``(low, high)`` display range: the given (centre, width), soft tissue for HU, else 1st-99th percentile."""
    if window is not None:
        centre, width = window
        if not width > 0:
            raise ValueError(f"window width must be positive; got {width}")
        return centre - width / 2, centre + width / 2
    values = image.ravel()
    step = max(1, values.size // 2_000_000)
    sample = values[::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    p0, p1, p99, p100 = np.percentile(sample, [0.5, 1.0, 99.0, 99.5])
    if -1100 <= p0 <= -500 and p100 < 5000:  # air at about -1000 HU: a CT in Hounsfield units
        centre, width = CT_WINDOW
        return centre - width / 2, centre + width / 2
    lo, hi = float(p1), float(p99)
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _fonts() -> dict[str, ImageFont.FreeTypeFont | ImageFont.ImageFont]:
    return {
        name: ImageFont.load_default(size=size)
        for name, size in (("banner", 24), ("title", 22), ("legend", 18), ("small", 14))
    }


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Hg")
    return int(bottom - min(top, 0)) + 6


def _fit(phys_w: float, phys_h: float, slot_w: int, slot_h: int) -> tuple[int, int]:
    scale = min(slot_w / phys_w, slot_h / phys_h)
    return max(1, int(round(phys_w * scale))), max(1, int(round(phys_h * scale)))


def _render_slice(
    image2d: np.ndarray,
    labels2d: np.ndarray,
    size: tuple[int, int],
    window: tuple[float, float],
    colors: Mapping[int, tuple[int, int, int]],
) -> np.ndarray:
    """One panel: the windowed slice resized to ``size`` (w, h), label fill and outlines on top."""
    w, h = size
    data = np.nan_to_num(image2d.astype(np.float32), nan=window[0])
    resized = np.asarray(Image.fromarray(data).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    lo, hi = window
    grey = np.clip((resized - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    shrinking = w < labels2d.shape[1] or h < labels2d.shape[0]
    display = np.zeros((h, w), dtype=np.int32)
    palette = [(0, 0, 0)]
    for value in (int(v) for v in np.unique(labels2d) if v != 0):
        mask = Image.fromarray(np.where(labels2d == value, 255, 0).astype(np.uint8))
        if shrinking:  # area-weighted: a voxel smaller than a display pixel stays visible
            shown = np.asarray(mask.resize((w, h), Image.Resampling.BOX)) > 0
        else:
            shown = np.asarray(mask.resize((w, h), Image.Resampling.NEAREST)) > 127
        palette.append(colors.get(value, UNLISTED_COLOR))
        display[shown] = len(palette) - 1
    if len(palette) > 1:
        lut = np.array(palette, dtype=np.float32)
        inside = display > 0
        rgb[inside] = rgb[inside] * (1.0 - FILL_ALPHA) + lut[display[inside]] * FILL_ALPHA
        size_px = 2 * _OUTLINE_PX + 1
        hi_f = ndimage.maximum_filter(display, size=size_px, mode="constant", cval=0)
        lo_f = ndimage.minimum_filter(display, size=size_px, mode="constant", cval=0)
        edge = inside & (hi_f != lo_f)
        rgb[edge] = lut[display[edge]]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _format_ml(value: float) -> str:
    if value == 0:
        return "0 mL"
    if value < 10:
        return f"{value:.2f} mL"
    return f"{value:.1f} mL"


def _format_unit(unit: str | None) -> str:
    if not unit:
        return ""
    return unit.strip("[]")


def _legend_lines(
    segments: Sequence[Segment], metrics: Mapping[str, Any], voxel_ml: float
) -> list[tuple[tuple[int, int, int], str, bool]]:
    """(colour, text, present) per output segment, from the metrics (voxel counts as a fallback)."""
    entries = metrics.get("segments", {}) if isinstance(metrics, Mapping) else {}
    lines = []
    for seg in segments:
        spec = seg.spec
        entry = entries.get(str(seg.number)) or {}
        voxels = int(entry.get("voxels", int(np.count_nonzero(seg.mask))))
        volume_ml = entry.get("volume_ml")
        if volume_ml is None:
            volume_ml = voxels * voxel_ml
        parts = [f"{entry.get('name', spec.name)}: {_format_ml(float(volume_ml))}"]
        means = entry.get("mean")
        if isinstance(means, Mapping):
            unit = _format_unit(entry.get("mean_unit"))
            for role, mean in means.items():
                if mean is not None:
                    parts.append(f"mean {role} {float(mean):.1f}{' ' + unit if unit else ''}")
        if entry.get("count") is not None:
            count = int(entry["count"])
            parts.append(f"{count} lesion{'' if count == 1 else 's'}" if count else "no lesion detected")
        if entry.get("confidence") is not None:
            parts.append(f"confidence {float(entry['confidence']) * 100:.0f}%")
        qc = entry.get("qc") or {}
        if qc.get("plausible") is False:
            parts.append("QC: implausible volume")
        present = bool(voxels) or bool(volume_ml)
        if not present and entry.get("count") is None:
            parts.append("not found")
        lines.append((spec.color, ",  ".join(parts), present))
    return lines


def compose_key_image(
    image: Volume,
    labels: Volume,
    manifest: Manifest,
    metrics: Mapping[str, Any],
    *,
    title: str,
    demo: bool,
    window: tuple[float, float] | None = None,
    width: int = WIDTH,
    segments: Sequence[Segment] | None = None,
) -> KeyImage:
    """Render the key image and describe what it shows.

    Args:
        image: The reference series as a volume (what the model segmented).
        labels: The label map on ``image``'s grid (0 = background).
        manifest: The model's manifest (segment names and colours).
        metrics: :func:`inference.segments.measure_segments`'s dict (``segments`` -> number ->
            name, volume_ml, mean, mean_unit, count, confidence, qc; ``qc`` of the whole result);
            missing volumes are counted from the segments.
        title: The heading (pipeline, model name and version).
        demo: Draw the "DEMO MODEL - NOT FOR CLINICAL USE" banners.
        window: Display window ``(centre, width)``; default: soft tissue
            (W 400 / L 40) when the values look like Hounsfield units, otherwise
            the 1st-99th percentile of the volume.
        width: Width of the image in pixels (at least 600).
        segments: The output segments (default: built from ``labels``); drawn with the
            LABELMAP precedence, a later segment over an earlier one.

    Returns:
        A :class:`KeyImage`.

    Raises:
        GeometryError: If ``labels`` does not lie on ``image``'s grid.
        ValueError: If ``width`` is below 600 or the window width is not positive.
    """
    if width < 600:
        raise ValueError(f"width must be at least 600 pixels; got {width}")
    if image.shape != labels.shape or not image.same_grid(labels, tolerance_mm=1e-2):
        raise GeometryError(
            f"the label map (shape {labels.shape}) does not lie on the grid of series {image.series_uid or '?'} "
            f"(shape {image.shape}); resample it onto the image grid first"
        )
    if segments is None:
        segments = build_segments(labels, manifest, midline_x=None)
    label_array = display_labels(segments, labels.shape)
    chosen, findings = choose_key_slices(label_array, _SLOTS)
    view = _view(image)
    chosen = _display_order(image, chosen, view.plane)
    low_high = _window(image.array, window)
    colors = {seg.number: seg.spec.color for seg in segments}

    fonts = _fonts()
    _, rows, cols = image.shape
    disp_w_px, disp_h_px = (rows, cols) if view.transpose else (cols, rows)
    phys_w, phys_h = disp_w_px * view.spacing_h, disp_h_px * view.spacing_v
    slot_w = (width - 2 * _MARGIN - (_SLOTS - 1) * _GAP) // _SLOTS
    slot_h = int(min(max(slot_w * phys_h / phys_w, slot_w * 0.5), slot_w * 1.5))
    img_w, img_h = _fit(phys_w, phys_h, slot_w, slot_h)

    legend = _legend_lines(segments, metrics, image.voxel_volume_ml)
    qc = metrics.get("qc") or {} if isinstance(metrics, Mapping) else {}
    qc_lines = [f"QC: {reason}" for reason in qc.get("reasons", [])] if qc.get("flagged") else []
    banner_h = 40 if demo else 0
    title_h = _line_height(fonts["title"])
    small_h = _line_height(fonts["small"])
    legend_h = _line_height(fonts["legend"]) + 4
    n_legend = len(legend) + (0 if findings else 1) + len(qc_lines)
    height = (
        banner_h + 10 + title_h + small_h + 8 + slot_h + small_h + 10 + legend_h * n_legend + 6 + small_h + 8 + banner_h
    )
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def centred(y: int, text: str, font: Any, fill: tuple[int, int, int]) -> None:
        x = (width - draw.textlength(text, font=font)) / 2
        draw.text((x, y), text, font=font, fill=fill)

    def banner(y: int) -> None:
        draw.rectangle((0, y, width - 1, y + banner_h - 1), fill=BANNER_COLOR)
        font = fonts["banner"]
        _, top, _, bottom = draw.textbbox((0, 0), DEMO_WARNING, font=font)
        centred(int(y + (banner_h - (bottom - top)) / 2 - top), DEMO_WARNING, font, (255, 255, 255))

    y = 0
    if demo:
        banner(y)
        y += banner_h
    y += 10
    draw.text((_MARGIN, y), title, font=fonts["title"], fill=_TEXT)
    y += title_h
    right_letter, down_letter = _letter(view.right), _letter(view.down)
    # burned-in markers use the S/I that viewers show; PatientOrientation keeps DICOM's H/F
    shown = {"H": "S", "F": "I"}
    left_letter, up_letter = (shown.get(c, c) for c in (_letter(-view.right), _letter(-view.down)))
    convention = "radiological view" if view.plane != "sagittal" else "anterior on the left"
    subtitle = (
        f"{len(chosen)} key {view.plane} slice{'s' if len(chosen) != 1 else ''} of {image.shape[0]} "
        f"({convention}: patient {shown.get(right_letter, right_letter)} on the image's right); "
        "outlines and fill from the automated segmentation"
    )
    draw.text((_MARGIN, y), subtitle, font=fonts["small"], fill=_MUTED)
    y += small_h + 8

    panels_w = len(chosen) * slot_w + (len(chosen) - 1) * _GAP
    x0 = (width - panels_w) // 2
    boxes: list[tuple[int, int, int, int]] = []
    for i, k in enumerate(chosen):
        slot_x = x0 + i * (slot_w + _GAP)
        left = slot_x + (slot_w - img_w) // 2
        top = y + (slot_h - img_h) // 2
        pixels = _render_slice(
            view.apply(np.asarray(image.array[k])),
            view.apply(label_array[k]),
            (img_w, img_h),
            low_high,
            colors,
        )
        canvas.paste(Image.fromarray(pixels), (left, top))
        boxes.append((left, top, left + img_w, top + img_h))
        font = fonts["small"]
        for letter, xy, anchor in (
            (left_letter, (left + 4, top + img_h / 2), "lm"),
            (shown.get(right_letter, right_letter), (left + img_w - 4, top + img_h / 2), "rm"),
            (up_letter, (left + img_w / 2, top + 4), "mt"),
        ):
            draw.text(xy, letter, font=font, fill=_TEXT, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
        caption = f"slice {k + 1}/{image.shape[0]}"
        draw.text((slot_x + slot_w / 2, y + slot_h + 3), caption, font=font, fill=_MUTED, anchor="mt")
    y += slot_h + small_h + 10

    font = fonts["legend"]
    swatch = legend_h - 12
    for color, text, present in legend:
        draw.rectangle((_MARGIN, y + 3, _MARGIN + swatch, y + 3 + swatch), fill=color, outline=_TEXT)
        draw.text((_MARGIN + swatch + 12, y + 1), text, font=font, fill=_TEXT if present else _MUTED)
        y += legend_h
    if not findings:
        draw.text((_MARGIN, y + 1), "No findings: the model labelled no voxel in this series.", font=font, fill=_TEXT)
        y += legend_h
    for line in qc_lines:
        draw.text((_MARGIN, y + 1), line, font=font, fill=QC_COLOR)
        y += legend_h
    y += 6
    draw.text(
        (_MARGIN, y),
        "Automated result: volumes from voxel counts; verify against the source images before use.",
        font=fonts["small"],
        fill=_MUTED,
    )
    y += small_h + 8
    if demo:
        banner(y)

    refs: list[tuple[str, int | None]] = []
    if image.sop_uids:
        for k in chosen:
            frame = image.frame_numbers[k] if image.frame_numbers is not None else None
            refs.append((image.sop_uids[k], frame))
    rgb = np.asarray(canvas, dtype=np.uint8).copy()
    logger.debug(
        "key image of series %s: slices %s, %dx%d px, findings=%s", image.series_uid, chosen, width, height, findings
    )
    return KeyImage(
        rgb=rgb,
        slices=tuple(chosen),
        boxes=tuple(boxes),
        references=tuple(refs),
        patient_orientation=(right_letter, down_letter),
        plane=view.plane,
        findings=findings,
    )


def render_key_image(
    image: Volume,
    labels: Volume,
    manifest: Manifest,
    metrics: Mapping[str, Any],
    *,
    title: str,
    demo: bool,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """The key image's pixels, (H, W, 3) uint8 (see :func:`compose_key_image`, which also says what they show).

    Raises:
        GeometryError: If ``labels`` does not lie on ``image``'s grid.
        ValueError: If the window width is not positive.
    """
    return compose_key_image(image, labels, manifest, metrics, title=title, demo=demo, window=window).rgb


# --------------------------------------------------------------------------- outputs


def _pixels(rgb: np.ndarray | KeyImage) -> np.ndarray:
    pixels = rgb.rgb if isinstance(rgb, KeyImage) else np.asarray(rgb)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"a key image is an (H, W, 3) uint8 array; got shape {pixels.shape} dtype {pixels.dtype}")
    return np.ascontiguousarray(pixels)


def png_bytes(rgb: np.ndarray | KeyImage) -> bytes:
    """The key image as PNG (lossless, zlib at its strongest setting).

    Raises:
        ValueError: If the pixels are not an (H, W, 3) uint8 array.
    """
    buf = io.BytesIO()
    Image.fromarray(_pixels(rgb)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _reference_item(ds: Dataset, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame
    return item


def build_key_image_sc(
    rgb: np.ndarray | KeyImage,
    sources: Sequence[Dataset],
    identity: ResultIdentity,
    *,
    pipeline: str,
    manifest: Manifest,
    node_version: str,
    series_number: int = 9003,
) -> Dataset:
    """The key image as a Secondary Capture Image (RGB, 8 bit) in the source study.

    Patient and study attributes (with the source's Specific Character Set) come
    from the first source; the series and instance UIDs from ``identity``
    (``"SC"``), so a re-run replaces the same object. Burned In Annotation is YES.
    The Source Image Sequence references the shown slices when ``rgb`` is a
    :class:`KeyImage` whose references are among ``sources``, otherwise every
    source image; the Referenced Series Sequence lists them by series.

    Args:
        rgb: The pixels (H, W, 3) uint8, or a :class:`KeyImage` (which also gives
            the shown slices and the patient orientation of the panels).
        sources: Images of the reference series (at least one, one study).
        identity: The job's :class:`~inference.outputs.common.ResultIdentity`.
        pipeline: The pipeline name (in the Series Description).
        manifest: The model's manifest (name, version, demo flag).
        node_version: The node's version (Software Versions).
        series_number: Series Number of the key image series.

    Raises:
        ValueError: If there is no source, the sources belong to several studies,
            or the pixels are not (H, W, 3) uint8.
    """
    pixels = _pixels(rgb)
    if not sources:
        raise ValueError("a key image needs at least one source image to join its study")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"the source images belong to {len(studies)} studies ({sorted(studies)}); give one study's")
    ref = sources[0]
    orientation = rgb.patient_orientation if isinstance(rgb, KeyImage) else None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=identity.series_uid("SC"),
        series_number=series_number,
        sop_instance_uid=identity.instance_uid("SC"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI {pipeline} key image"[:64],
        manufacturer_model_name=manifest.name[:64],
    )
    copy_study_attributes(ref, sc)
    if orientation is None:  # several panels of unknown orientation: Type 2, empty
        sc.add_new("PatientOrientation", "CS", None)
    sc.add_new("SoftwareVersions", "LO", software_versions(manifest.name, manifest.version, node_version))
    sc.ConversionType = "WSD"
    sc.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    sc.SecondaryCaptureDeviceManufacturerModelName = manifest.name[:64]
    sc.SecondaryCaptureDeviceSoftwareVersions = software_versions(manifest.name, manifest.version, node_version)
    sc.BurnedInAnnotation = "YES"
    if ref.get("Laterality"):  # Type 2C: the source's when it has one
        sc.Laterality = ref.Laterality
    else:
        # Laterality (Type 2C) is wanted when no Image Laterality says the side; the panels show
        # both sides of the body (both kidneys, both nuclei, both hemispheres), which Image
        # Laterality can say ("B") and an empty Laterality cannot
        if "Laterality" in sc:
            del sc.Laterality
        sc.ImageLaterality = str(ref.get("ImageLaterality") or "B")
    description = (
        f"Key image of the {pipeline} segmentation by {manifest.name} {manifest.version}: overlay and legend burned in"
    )
    if manifest.demo:
        description += f". {DEMO_WARNING}"
    sc.DerivationDescription = description[:1024]
    sc.ImageComments = description

    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    wanted: list[tuple[Dataset, int | None]] = []
    if isinstance(rgb, KeyImage):
        wanted = [(by_uid[uid], frame) for uid, frame in rgb.references if uid in by_uid]
    if not wanted:
        wanted = [(ds, None) for ds in sources]
    seen: set[tuple[str, int | None]] = set()
    items: list[Dataset] = []
    per_series: dict[str, list[Dataset]] = {}
    for ds, frame in wanted:
        key = (str(ds.SOPInstanceUID), frame)
        if key in seen:
            continue
        seen.add(key)
        items.append(_reference_item(ds, frame))
        series_items = per_series.setdefault(str(ds.SeriesInstanceUID), [])
        if all(i.ReferencedSOPInstanceUID != ds.SOPInstanceUID for i in series_items):
            series_items.append(_reference_item(ds, None))
    sc.SourceImageSequence = items
    referenced_series = []
    for series_uid, instances in per_series.items():
        entry = Dataset()
        entry.SeriesInstanceUID = series_uid
        entry.ReferencedInstanceSequence = instances
        referenced_series.append(entry)
    sc.ReferencedSeriesSequence = referenced_series
    logger.info(
        "key image SC %s for study %s (%d source references)", sc.SOPInstanceUID, sc.StudyInstanceUID, len(items)
    )
    return sc
