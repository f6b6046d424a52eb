"""The model package: a folder with a ``model.yaml`` manifest.

A package says what the model is (name, version, intended use, whether it is a
demo model), which series roles feed its input channels, the labels it produces
(with SNOMED CT codes and display colours for SEG), the stages that produce
them (one, or a two-stage cascade), and how each stage runs (``nnunet``: an
nnU-Net v2 results folder; ``native``: a network class the node knows, with
weights in safetensors). Paths inside are relative to the package folder and may
not leave it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.codes import CODES
from inference.errors import ModelPackageError

MANIFEST_NAME = "model.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_color(v: tuple[int, int, int]) -> tuple[int, int, int]:
    if any(c < 0 or c > 255 for c in v):
        raise ValueError("colour components must be 0-255")
    return v


#: a display colour, RGB 0-255 (SEG CIELab and the key image come from it)
Color = Annotated[tuple[int, int, int], AfterValidator(_check_color)]


class Code(_Frozen):
    """A coded concept (SNOMED CT by default), given inline or as a key of :data:`inference.codes.CODES`."""

    value: str
    meaning: str
    scheme: str = "SCT"

    @model_validator(mode="before")
    @classmethod
    def _by_key(cls, v: Any) -> Any:
        if isinstance(v, str):
            entry = CODES.get(v)
            if entry is None:
                known = ", ".join(sorted(CODES))
                raise ValueError(f"unknown concept {v!r}; known: {known} (or give value, meaning and scheme)")
            return {"value": entry.value, "meaning": entry.meaning, "scheme": entry.scheme}
        return v


class LabelSpec(_Frozen):
    """One output label."""

    name: str
    category: Code = Code(value="91723000", meaning="Anatomical Structure")
    type: Code
    modifier: Code | None = None
    laterality: Literal["left", "right"] | None = None
    color: Color = (255, 0, 0)
    #: input roles whose mean value inside the label is reported (QSM in ppb, ADC)
    measure_mean_of: tuple[str, ...] = ()
    #: unit of those means (UCUM), e.g. "[ppb]" or "um2/s"
    mean_unit: str | None = None
    #: report each connected component's volume and their count (stroke lesions)
    count_components: bool = False
    #: labels that belong to the same organ when connected to this one; the reported
    #: volume is the whole organ's (a kidney = its sinus label + parenchyma + tumour)
    volume_includes: tuple[int, ...] = ()


class SegmentSpec(_Frozen):
    """One output segment: what the SEG draws, the SR measures and the key image shows.

    A segment is the union of ``labels`` of the final label map; with ``side_of``
    only the voxels of the organs on the segment's ``laterality`` side (connected
    components of the ``side_of`` labels, sided in patient coordinates) count.
    Segments may overlap (a whole kidney contains its parenchyma): a BINARY SEG
    carries that; a LABELMAP SEG paints segments in ascending number, so a later
    (finer) segment shows over an earlier one. Every reported number of a segment
    is measured on exactly these voxels.
    """

    name: str
    labels: tuple[int, ...]
    category: Code = Code(value="91723000", meaning="Anatomical Structure")
    type: Code
    modifier: Code | None = None
    laterality: Literal["left", "right"] | None = None
    #: restrict to the organs (components of these labels) on the laterality side
    side_of: tuple[int, ...] = ()
    #: anatomic location (SEG anatomic region, SR finding site); None: the type is the anatomy
    anatomy: Code | None = None
    color: Color = (255, 0, 0)
    measure_mean_of: tuple[str, ...] = ()
    mean_unit: str | None = None
    count_components: bool = False
    #: False: the model card does not validate this output; left out of what goes to the PACS by default
    validated: bool = True
    #: plausible volume range in mL (outside it, or empty when min > 0, the result is flagged for QC)
    plausible_ml: tuple[float, float] | None = None
    #: labels that join the segment where they touch it (26-connected): a sinus label grows into its kidney
    grow_into: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _sided(self) -> SegmentSpec:
        if self.side_of and self.laterality is None:
            raise ValueError(f"segment {self.name!r}: side_of needs a laterality (left or right)")
        if not self.labels:
            raise ValueError(f"segment {self.name!r}: labels: at least one label value")
        if self.plausible_ml is not None and self.plausible_ml[0] > self.plausible_ml[1]:
            raise ValueError(f"segment {self.name!r}: plausible_ml: the minimum exceeds the maximum")
        return self


class InputChannel(_Frozen):
    """One input channel, filled from a series role."""

    role: str
    #: for a DWI role: the b-value to select from a multi-b-value series
    b_value: float | None = None
    #: optional channels are filled with zeros when their series did not come
    optional: bool = False


class Normalization(_Frozen):
    """Intensity normalisation of a native stage."""

    scheme: Literal["ct", "zscore", "none"] = "zscore"
    clip: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None

    @model_validator(mode="after")
    def _ct(self) -> Normalization:
        if self.scheme == "ct" and (self.clip is None or self.mean is None or self.std is None):
            raise ValueError("ct normalisation needs clip, mean and std (stored training statistics)")
        return self


class NnUNetBackend(_Frozen):
    """An nnU-Net v2 results folder run in-process by nnUNetPredictor."""

    backend: Literal["nnunet"]
    #: trainer__plans__configuration folder(s); several are an ensemble (probabilities averaged)
    folders: tuple[str, ...]
    folds: tuple[int | Literal["all"], ...] = (0,)
    checkpoint: str = "checkpoint_final.pth"
    tile_step_size: float = 0.5
    use_mirroring: bool = True
    #: orientation the model was trained in (DICOM-style code of SimpleITK's
    #: DICOMOrient, e.g. "LPS" or "RAS"); the image is reoriented before and
    #: the result back after. None feeds the reference series as it lies.
    orientation: str | None = None
    #: SHA-256 (hex) of files of the folders, by path relative to the package folder
    #: (``pacs-node models import`` records every checkpoint, plans.json, dataset.json and
    #: postprocessing.pkl); checked before anything is loaded. When given, every
    #: checkpoint the stage loads must be listed.
    sha256: dict[str, str] = Field(default_factory=dict)

    @field_validator("folders", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("sha256")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for path, digest in v.items():
            d = str(digest).strip().lower()
            if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
                raise ValueError(f"sha256: {path!r}: {digest!r} is not a SHA-256 digest (64 hex digits)")
            out[path] = d
        return out


class NativeBackend(_Frozen):
    """A network class the node knows, weights in safetensors (nothing unpickled)."""

    backend: Literal["native"]
    network: Literal["DynUNet", "PlainConvUNet"]
    network_args: dict[str, Any]
    weights: str
    #: target voxel spacing (x, y, z) in mm; the input is resampled to it and back
    spacing: tuple[float, float, float]
    #: sliding-window patch size (z, y, x) in voxels
    patch_size: tuple[int, int, int]
    normalization: Normalization = Normalization()
    #: flip axes (0=z, 1=y, 2=x of the patch) averaged at test time
    mirror_axes: tuple[int, ...] = ()
    overlap: float = 0.5
    orientation: str | None = "LPS"


Backend = Annotated[NnUNetBackend | NativeBackend, Field(discriminator="backend")]


class CropSpec(_Frozen):
    """How a second stage takes its crops from the first."""

    from_stage: str
    labels: tuple[int, ...]
    margin_mm: float = 10.0
    #: one crop per connected component (kidneys) or one around all of them
    per_component: bool = True
    #: crop around the N largest components of ``labels`` only (a stray false positive
    #: of the localiser then cannot blow a crop up to the whole image)
    largest: int | None = Field(None, ge=1)


class StageSpec(_Frozen):
    """One stage of a pipeline."""

    name: str
    model: Backend
    #: stage output value -> final label value (unmapped values are dropped)
    label_map: dict[int, int]
    crop: CropSpec | None = None
    #: labels of this stage are written into the final map (a localiser may not be)
    final: bool = True


class PostProcess(_Frozen):
    """Post-processing of the final label map."""

    #: label -> number of largest components to keep
    keep_largest: dict[int, int] = Field(default_factory=dict)
    #: label -> drop components smaller than this (mm^3)
    min_size_mm3: dict[int, float] = Field(default_factory=dict)
    #: a label to split into left/right by patient coordinates: {label: [left_value, right_value]}
    split_laterality: dict[int, tuple[int, int]] = Field(default_factory=dict)
    #: for a split label: other labels that belong to the same organ, so that sides are
    #: decided per whole organ (connected components of the union), not per fragment
    laterality_with: dict[int, tuple[int, ...]] = Field(default_factory=dict)


class Manifest(_Frozen):
    """The content of ``model.yaml``."""

    name: str
    version: str
    intended_use: str
    demo: bool = False
    description: str = ""
    inputs: tuple[InputChannel, ...]
    reference: str
    labels: dict[int, LabelSpec]
    #: output segments; absent: one per label (a label with volume_includes grows into the connected ones)
    segments: tuple[SegmentSpec, ...] = ()
    stages: tuple[StageSpec, ...]
    postprocess: PostProcess = PostProcess()
    #: the pipeline may use a GPU when present
    gpu: bool = True
    #: the synthetic phantom family it can be evaluated on (``pacs-node models evaluate``)
    phantom_task: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        roles = [c.role for c in self.inputs]
        if self.reference not in roles:
            raise ValueError(f"reference: {self.reference!r} is not an input role ({roles})")
        if any(c.optional for c in self.inputs if c.role == self.reference):
            raise ValueError("reference: the reference input cannot be optional")
        if 0 in self.labels:
            raise ValueError("labels: 0 is background and is not listed")
        names = [s.name for s in self.stages]
        if not names:
            raise ValueError("stages: at least one stage is needed")
        for i, stage in enumerate(self.stages):
            if stage.crop is not None and stage.crop.from_stage not in names[:i]:
                raise ValueError(f"stages[{i}].crop.from_stage: {stage.crop.from_stage!r} is not an earlier stage")
            for out in stage.label_map.values():
                if stage.final and out not in self.labels:
                    raise ValueError(f"stages[{i}].label_map: label {out} is not declared under labels")
        for label, spec in self.labels.items():
            for other in spec.volume_includes:
                if other not in self.labels or other == label:
                    raise ValueError(f"labels.{label}.volume_includes: {other} is not another declared label")
            for role in spec.measure_mean_of:
                if role not in roles:
                    raise ValueError(f"labels.{label}.measure_mean_of: {role!r} is not an input role")
        for k, seg in enumerate(self.segments):
            for value in (*seg.labels, *seg.side_of, *seg.grow_into):
                if value not in self.labels:
                    raise ValueError(f"segments[{k}] ({seg.name}): label {value} is not declared under labels")
            for role in seg.measure_mean_of:
                if role not in roles:
                    raise ValueError(f"segments[{k}] ({seg.name}).measure_mean_of: {role!r} is not an input role")
        return self

    @property
    def output_segments(self) -> tuple[SegmentSpec, ...]:
        """The segments the outputs carry, numbered 1..N in this order.

        Without ``segments`` in the manifest: one per label in ascending label value,
        with the label's own codes; a label with ``volume_includes`` (a kidney's sinus
        label with parenchyma and tumour) becomes the whole organ.
        """
        if self.segments:
            return self.segments
        return tuple(
            SegmentSpec(
                name=spec.name,
                labels=(value,),
                category=spec.category,
                type=spec.type,
                modifier=spec.modifier,
                laterality=spec.laterality,
                color=spec.color,
                measure_mean_of=spec.measure_mean_of,
                mean_unit=spec.mean_unit,
                count_components=spec.count_components,
                grow_into=spec.volume_includes,
            )
            for value, spec in sorted(self.labels.items())
        )

    @property
    def channel_roles(self) -> list[str]:
        """Input roles in channel order."""
        return [c.role for c in self.inputs]


class ModelPackage:
    """A validated model package folder.

    Args:
        folder: the package folder holding ``model.yaml``.

    Raises:
        ModelPackageError: the folder, manifest, or a file it names is missing or invalid.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            raise ModelPackageError(f"{self.folder}: no {MANIFEST_NAME}; is this a pacs-node model package?")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ModelPackageError(f"{path}: not valid YAML: {exc}") from exc
        try:
            self.manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            lines = [
                f"  {'.'.join(str(p) for p in e['loc'] if p not in ('nnunet', 'native'))}: "
                f"{e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            ]
            raise ModelPackageError(f"{path}: invalid manifest:\n" + "\n".join(lines)) from exc
        for stage in self.manifest.stages:
            model = stage.model
            names = model.folders if isinstance(model, NnUNetBackend) else (model.weights,)
            for name in names:
                self.resolve(name, what=f"stage {stage.name}")

    def resolve(self, relative: str, *, what: str = "file") -> Path:
        """A path inside the package.

        Raises:
            ModelPackageError: the path leaves the package or does not exist.
        """
        p = (self.folder / relative).resolve()
        if p != self.folder and self.folder not in p.parents:
            raise ModelPackageError(f"{what}: {relative!r} points outside the model package {self.folder}")
        if not p.exists():
            raise ModelPackageError(f"{what}: {relative!r} not found in the model package {self.folder}")
        return p

    @property
    def card(self) -> str | None:
        """The model card (MODEL_CARD.md) when the package has one."""
        p = self.folder / "MODEL_CARD.md"
        return p.read_text(encoding="utf-8") if p.is_file() else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
