"""Run a model package on DICOM series: datasets in, label volume and metrics out.

:class:`ModelRunner` loads a package once (every stage's network on the chosen
device) and then runs case after case:

1. build inputs: each channel's series becomes a :class:`~inference.volume.Volume`
   (DWI: the b-value the manifest asks for), secondary channels are resampled
   onto the reference series' grid in patient space and stacked in manifest order;
2. predict: the stages (one, or a cascade of localise-then-segment), on the GPU
   when allowed and present, falling back to the CPU when the GPU runs out of memory;
3. post-process (small components, largest components, left/right from patient
   coordinates, a single organ placed by the body midline);
4. segments (:mod:`inference.segments`): the manifest's output segments as masks,
   overlapping where the anatomy does (a kidney contains its parenchyma);
5. measure each segment on its own voxels: volume, mean input values, lesions
   (volume, centroid, slices), mean network confidence, plausibility (QC).

The label volume stays on the reference series' own grid and slice order, with
its slice -> SOP Instance UID map, so that SEG frames reference the right images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset

from inference.backends import StagePredictor
from inference.cascade import run_cascade
from inference.errors import InferenceError, ModelPackageError
from inference.manifest import Manifest, ModelPackage, NativeBackend, NnUNetBackend, StageSpec
from inference.postprocess import apply_postprocess
from inference.segments import Segment, body_midline_x, build_segments, measure_segments
from inference.volume import Volume, resample_to, select_b_value, volume_from_datasets

logger = logging.getLogger(__name__)


class MissingInputError(InferenceError):
    """A channel the model requires has no series."""


@dataclass
class SegmentationResult:
    """What one run produced."""

    labels: Volume
    metrics: dict[str, Any]
    timings: dict[str, float]
    model: dict[str, Any]
    channels: dict[str, Volume] = field(default_factory=dict, repr=False)
    #: the output segments (numbered 1..N), on the labels' grid; every metric is measured on them
    segments: list[Segment] = field(default_factory=list, repr=False)

    def save_labels(self, path: str | Path) -> Path:
        """Write the label volume (uint8, source geometry) as NIfTI or NRRD by suffix."""
        import SimpleITK as sitk

        path = Path(path)
        img = self.labels.with_array(self.labels.array.astype(np.uint8)).to_sitk()
        sitk.WriteImage(img, str(path), useCompression=True)
        return path


def build_stage(spec: StageSpec, folder: Path, device: torch.device) -> StagePredictor:
    """Load one stage's network on ``device``.

    Raises:
        ModelPackageError: the backend is unavailable or its files are invalid.
    """
    model = spec.model
    if isinstance(model, NnUNetBackend):
        try:
            from inference.backends.nnunet import NnUNetStage
        except ImportError as exc:  # nnunetv2 is an optional extra
            raise ModelPackageError(
                f"stage {spec.name} uses an nnU-Net v2 folder but nnunetv2 is not installed: "
                "pip install -c constraints.txt 'pacs-node[nnunet]'"
            ) from exc
        return NnUNetStage(model, folder, device=device)
    if isinstance(model, NativeBackend):
        from inference.backends.native import NativeStage

        return NativeStage(model, folder, device=device)
    raise ModelPackageError(f"stage {spec.name}: unknown backend {model!r}")


def build_inputs(
    manifest: Manifest, inputs: Mapping[str, Sequence[Dataset]]
) -> tuple[Volume, np.ndarray, dict[str, Volume]]:
    """Volumes per role on the reference grid, and the stacked (C, z, y, x) image.

    Secondary roles are resampled onto the reference series' grid in patient space;
    absent optional roles become zero channels. Training uses the same function, so
    a model sees the same inputs in training and in service.

    Raises:
        MissingInputError: a required channel has no series.
        GeometryError, PixelDataError, NoMatchingBValueError: a series cannot be used.
    """
    m = manifest
    by_role = {c.role: c for c in m.inputs}
    missing = [c.role for c in m.inputs if not c.optional and not inputs.get(c.role)]
    if missing:
        raise MissingInputError(
            f"model {m.name} needs input {', '.join(missing)} but the job has "
            f"{', '.join(sorted(r for r in inputs if inputs[r])) or 'no inputs'}; "
            "check the pipeline's input roles against the model's (model.yaml inputs)"
        )

    def load(role: str) -> Volume:
        datasets: Sequence[Any] = inputs[role]
        spec = by_role[role]
        if spec.b_value is not None:
            datasets = select_b_value(datasets, target=spec.b_value)
        return volume_from_datasets(datasets)

    reference = load(m.reference)
    volumes: dict[str, Volume] = {m.reference: reference}
    channels: list[np.ndarray] = []
    for chan in m.inputs:
        if chan.role == m.reference:
            channels.append(reference.array.astype(np.float32, copy=False))
            continue
        if not inputs.get(chan.role):
            logger.info("optional input %s absent: channel filled with zeros", chan.role)
            channels.append(np.zeros(reference.shape, dtype=np.float32))
            continue
        moving = load(chan.role)
        if moving.frame_of_reference_uid != reference.frame_of_reference_uid:
            # Series of one exam usually share scanner coordinates even when
            # the scanner wrote a new Frame of Reference UID; resample by
            # patient coordinates and say so.
            logger.warning(
                "input %s has another frame of reference than %s; resampling by patient coordinates",
                chan.role,
                m.reference,
            )
        vol = resample_to(moving, reference, interpolation="linear", check_frame_of_reference=False)
        volumes[chan.role] = vol
        channels.append(vol.array.astype(np.float32, copy=False))
    return reference, np.stack(channels), volumes


def _choose_device(allow_gpu: bool) -> torch.device:
    if allow_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class ModelRunner:
    """A loaded model package.

    Args:
        package: the package folder (or an already validated :class:`ModelPackage`).
        allow_gpu: use CUDA when present (and the manifest allows it).

    Raises:
        ModelPackageError: invalid manifest, missing files, or unloadable weights.
    """

    def __init__(self, package: str | Path | ModelPackage, *, allow_gpu: bool = True) -> None:
        t0 = time.perf_counter()
        self.package = package if isinstance(package, ModelPackage) else ModelPackage(package)
        self.manifest = self.package.manifest
        self.device = _choose_device(allow_gpu and self.manifest.gpu)
        self.stages = self._load(self.device)
        self._cpu_stages: list[tuple[StageSpec, StagePredictor]] | None = (
            self.stages if self.device.type == "cpu" else None
        )
        self.checksums: dict[str, str] = {}
        for spec, stage in self.stages:
            for name, digest in stage.checksums.items():
                self.checksums[f"{spec.name}/{name}"] = digest
        self.load_s = time.perf_counter() - t0
        logger.info(
            "model %s %s loaded on %s in %.1f s%s",
            self.manifest.name,
            self.manifest.version,
            self.device,
            self.load_s,
            " (DEMO model: not for clinical use)" if self.manifest.demo else "",
        )

    def _load(self, device: torch.device) -> list[tuple[StageSpec, StagePredictor]]:
        return [(spec, build_stage(spec, self.package.folder, device)) for spec in self.manifest.stages]

    @property
    def model_info(self) -> dict[str, Any]:
        """Name, version, demo flag and checksums, for the job record and outputs."""
        m = self.manifest
        return {
            "name": m.name,
            "version": m.version,
            "demo": m.demo,
            "intended_use": m.intended_use,
            "checksums": dict(self.checksums),
            "device": str(self.device),
        }

    def warm_up(self) -> float:
        """Run every stage once on a small empty image, so that the first real case does not pay for
        the kernels' first-call set-up (thread pools, oneDNN/cuDNN plans, allocator growth).

        Returns:
            the seconds it took.
        """
        t0 = time.perf_counter()
        channels = len(self.manifest.inputs)
        with torch.inference_mode():
            for spec, stage in self.stages:
                model = spec.model
                shape = tuple(int(s) for s in model.patch_size) if isinstance(model, NativeBackend) else (16, 64, 64)
                spacing = (
                    (float(model.spacing[2]), float(model.spacing[1]), float(model.spacing[0]))
                    if isinstance(model, NativeBackend)
                    else (1.0, 1.0, 1.0)
                )
                stage.predict_proba(np.zeros((channels, *shape), dtype=np.float32), spacing, np.eye(3))
        seconds = time.perf_counter() - t0
        logger.info("model %s %s warmed up in %.1f s", self.manifest.name, self.manifest.version, seconds)
        return seconds

    # -- inputs -------------------------------------------------------------------
    def build_inputs(self, inputs: Mapping[str, Sequence[Dataset]]) -> tuple[Volume, np.ndarray, dict[str, Volume]]:
        """Volumes per role on the reference grid, and the stacked (C, z, y, x) image (see :func:`build_inputs`)."""
        return build_inputs(self.manifest, inputs)

    # -- prediction ------------------------------------------------------------------
    def _predict(self, image: np.ndarray, ref: Volume) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        spacing_zyx = (ref.spacing[2], ref.spacing[1], ref.spacing[0])
        try:
            return run_cascade(image, spacing_zyx, ref.direction, self.stages)
        except torch.cuda.OutOfMemoryError:
            if self.device.type != "cuda":
                raise
            logger.warning(
                "GPU out of memory running model %s; falling back to the CPU for this case", self.manifest.name
            )
            torch.cuda.empty_cache()
            if self._cpu_stages is None:
                self._cpu_stages = self._load(torch.device("cpu"))
            return run_cascade(image, spacing_zyx, ref.direction, self._cpu_stages)

    def run(self, inputs: Mapping[str, Sequence[Dataset]]) -> SegmentationResult:
        """Segment one case.

        Raises:
            InferenceError: an input cannot be used (the message says why) or prediction failed.
        """
        timings: dict[str, float] = {}
        t = time.perf_counter()
        ref, image, volumes = self.build_inputs(inputs)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        with torch.inference_mode():
            labels, confidence, per_stage = self._predict(image, ref)
        timings["predict"] = time.perf_counter() - t
        timings.update({f"stage_{k}": v for k, v in per_stage.items()})

        t = time.perf_counter()
        spacing_zyx = (ref.spacing[2], ref.spacing[1], ref.spacing[0])
        midline = body_midline_x(ref)
        labels = apply_postprocess(
            labels, self.manifest.postprocess, spacing_zyx=spacing_zyx, index_to_lps=ref.index_to_lps, midline_x=midline
        ).astype(np.uint8)
        label_volume = ref.with_array(labels)
        segments = build_segments(label_volume, self.manifest, midline_x=midline)
        metrics = measure_segments(segments, label_volume, volumes, confidence=confidence, midline_x=midline)
        timings["postprocess"] = time.perf_counter() - t
        return SegmentationResult(
            labels=label_volume,
            metrics=metrics,
            timings={k: round(v, 3) for k, v in timings.items()},
            model=self.model_info,
            segments=segments,
            channels=volumes,
        )
