"""Import a trained nnU-Net v2 model as a pacs-node model package (``pacs-node models import``).

The source is what nnU-Net leaves after training or what its authors publish:

- a results folder ``Trainer__Plans__configuration`` (``dataset.json``,
  ``plans.json``, ``fold_N/checkpoint_final.pth``, optionally ``postprocessing.pkl``
  in the folder or in its ``crossval_results_folds_*`` folder);
- the ``DatasetNNN_Name`` folder above it, when it holds one such folder (or
  ``configuration`` picks one);
- the zip that ``nnUNetv2_export_model_to_zip`` writes (``DatasetNNN_Name/Trainer__Plans__configuration/...``),
  extracted member by member after every member has been checked to stay inside
  the extraction folder (no absolute paths, no ``..``, no links: zip-slip).

:func:`import_nnunet` writes a package that runs in the node unchanged: the used
folds' checkpoints and the folder's small files copied in (not the validation
predictions nor other checkpoints), a ``model.yaml`` with one input role per nnU-Net
channel in channel order, the labels of ``dataset.json`` with codes and colours, one
``nnunet`` stage, and the SHA-256 of every file the stage reads (checkpoints, plans,
dataset, postprocessing), which the backend checks before it unpickles anything.
The package is built next to the target, validated with
:class:`~inference.manifest.ModelPackage`, and only then moved into place.

Label names become codes through a small table of well-known names (kidney,
liver, spleen, tumour, lesion, infarct, dentate nucleus, brain, ...; laterality from
``left``/``right`` at either end of the name), then a site's ``codes`` mapping
(label name or value -> ``type``, ``category``, ``laterality``, ``color``, ``name``,
``validated``, ...). Names neither knows get the generic "Anatomical Structure"
and a warning. Segments are validated by default: a site importing its own
validated model expects the results to go to the PACS; ``validated: false`` in the
codes mapping keeps a label out of what is sent.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import ValidationError

from inference.codes import CODES, CodeEntry
from inference.errors import ModelPackageError
from inference.manifest import MANIFEST_NAME, Code, LabelSpec, ModelPackage, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INTENDED_USE",
    "EXTRA_CODES",
    "WELL_KNOWN",
    "ImportResult",
    "ImportedLabel",
    "InputRole",
    "extract_zip",
    "find_results_folder",
    "import_nnunet",
    "input_roles",
    "load_codes_file",
    "map_labels",
    "parse_role",
    "role_name",
    "summary",
]

DEFAULT_INTENDED_USE = (
    "Imported nnU-Net v2 model; imported, not validated by this node: the importing site is responsible "
    "for validating it for its use"
)
DEFAULT_CHECKPOINT = "checkpoint_final.pth"

#: concepts the well-known names need that :data:`inference.codes.CODES` does not hold, each with its source
#: (``tests/test_models_import.py`` checks them against pydicom's copy of PS3.16, as ``tests/test_codes.py`` does CODES)
EXTRA_CODES: dict[str, CodeEntry] = {
    "liver": CodeEntry("10200004", "Liver", "SCT", "DICOM CID 7151"),
    "spleen": CodeEntry("78961009", "Spleen", "SCT", "DICOM CID 7151"),
    "pancreas": CodeEntry("15776009", "Pancreas", "SCT", "DICOM CID 7151"),
    "gallbladder": CodeEntry("28231008", "Gallbladder", "SCT", "DICOM CID 7151"),
    "stomach": CodeEntry("69695003", "Stomach", "SCT", "DICOM CID 7151"),
    "adrenal_gland": CodeEntry("23451007", "Adrenal gland", "SCT", "DICOM CID 7151"),
    "lung": CodeEntry("39607008", "Lung", "SCT", "DICOM CID 7151"),
    "aorta": CodeEntry("15825003", "Aorta", "SCT", "DICOM CID 7151"),
    "inferior_vena_cava": CodeEntry("64131007", "Inferior vena cava", "SCT", "DICOM CID 7151"),
    "bladder": CodeEntry("89837001", "Bladder", "SCT", "DICOM CID 7151"),
    "lesion": CodeEntry("52988006", "Lesion", "SCT", "DICOM CID 7151"),
    "cyst": CodeEntry("367643001", "Cyst", "SCT", "DICOM CID 7151"),
    "mass": CodeEntry("4147007", "Mass", "SCT", "DICOM CID 7151"),
}

_ABNORMAL = "morphologically_abnormal_structure"
_ANATOMY = "anatomical_structure"


@dataclass(frozen=True)
class _Known:
    """What a well-known label name means: its type (a key of CODES or EXTRA_CODES) and category."""

    type: str
    category: str = _ANATOMY
    #: report the number and volume of connected components (lesions)
    count_components: bool = False


def _abnormal(key: str) -> _Known:
    return _Known(key, _ABNORMAL, count_components=True)


#: normalised label name (lower case, ``_`` between words, no side) -> meaning
WELL_KNOWN: dict[str, _Known] = {
    **{n: _Known("kidney") for n in ("kidney", "kidneys")},
    **{n: _Known("parenchyma") for n in ("parenchyma", "renal_parenchyma", "kidney_parenchyma")},
    **{
        n: _abnormal("neoplasm")
        for n in (
            "tumor",
            "tumour",
            "tumors",
            "tumours",
            "neoplasm",
            "kidney_tumor",
            "kidney_tumour",
            "renal_tumor",
            "renal_tumour",
        )
    },
    **{n: _abnormal("lesion") for n in ("lesion", "lesions")},
    **{n: _abnormal("cyst") for n in ("cyst", "cysts", "kidney_cyst", "renal_cyst")},
    **{n: _abnormal("mass") for n in ("mass", "masses", "renal_mass", "kidney_mass")},
    **{n: _abnormal("infarct") for n in ("infarct", "infarction", "stroke", "stroke_lesion", "infarct_core")},
    **{n: _Known("dentate_nucleus") for n in ("dentate", "dentate_nucleus", "dentate_nuclei", "dn")},
    "brain": _Known("brain"),
    "cerebellum": _Known("cerebellum"),
    **{n: _Known("cerebral_hemisphere") for n in ("hemisphere", "cerebral_hemisphere")},
    "liver": _Known("liver"),
    "spleen": _Known("spleen"),
    "pancreas": _Known("pancreas"),
    **{n: _Known("gallbladder") for n in ("gallbladder", "gall_bladder")},
    "stomach": _Known("stomach"),
    **{n: _Known("adrenal_gland") for n in ("adrenal_gland", "adrenal")},
    "lung": _Known("lung"),
    "aorta": _Known("aorta"),
    **{n: _Known("inferior_vena_cava") for n in ("inferior_vena_cava", "ivc")},
    **{n: _Known("bladder") for n in ("urinary_bladder", "bladder")},
}

#: distinct display colours, given to labels in order unless the codes mapping names one
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)

#: fields a codes mapping entry may give
_CODES_FIELDS = {
    "name",
    "type",
    "category",
    "modifier",
    "laterality",
    "color",
    "validated",
    "anatomy",
    "count_components",
    "measure_mean_of",
    "mean_unit",
}
_SIDES = ("left", "right")
_ROLE_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class InputRole:
    """One input channel of the imported model."""

    channel: int
    #: the channel's name in dataset.json (channel_names)
    source: str
    role: str
    b_value: float | None = None
    optional: bool = False

    def manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"role": self.role}
        if self.b_value is not None:
            entry["b_value"] = self.b_value
        if self.optional:
            entry["optional"] = True
        return entry


@dataclass(frozen=True)
class ImportedLabel:
    """One label of the imported model and how its codes were found."""

    value: int
    #: the label's name in dataset.json
    source: str
    #: the ``labels:`` entry of model.yaml
    spec: dict[str, Any]
    validated: bool = True
    #: the anatomic location, when the codes mapping gives one (then model.yaml lists segments)
    anatomy: Any = None
    #: "codes file", "well-known name" or "generic"
    origin: str = "generic"

    def describe(self) -> str:
        """``type / category`` in words, with codes."""
        t = Code.model_validate(self.spec["type"])
        c = Code.model_validate(self.spec["category"])
        return f"{t.meaning} ({t.scheme} {t.value}) / {c.meaning}"


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_nnunet` wrote."""

    package: Path
    source: Path
    #: the results folder's path inside the source (for a zip: inside the archive)
    source_folder: str
    #: the results folder's name inside the package
    folder: str
    manifest: dict[str, Any]
    roles: tuple[InputRole, ...]
    labels: tuple[ImportedLabel, ...]
    folds: tuple[int | str, ...]
    checkpoint: str
    #: path relative to the package -> SHA-256
    checksums: dict[str, str]
    postprocessing: str | None
    warnings: tuple[str, ...] = field(default_factory=tuple)


# -- names ------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.strip().lower()) if w]


def role_name(text: str) -> str:
    """A channel name of dataset.json as an input role: lower case, ``_`` between words (``"ADC map"`` -> ``adc_map``).

    Raises:
        ModelPackageError: nothing of the name is left.
    """
    words = _words(text)
    if not words:
        raise ModelPackageError(f"channel name {text!r}: no letters or digits to make an input role of")
    name = "_".join(words)
    return name if name[0].isalpha() else f"ch_{name}"


def parse_role(text: str) -> tuple[int, str, float | None, bool]:
    """One ``--role`` option: ``INDEX=NAME[:b=VALUE][:optional]`` (``0=dwi:b=1000``, ``2=flair:optional``).

    Returns:
        (channel index, role, b-value or None, optional).

    Raises:
        ModelPackageError: the text is not of that form.
    """
    usage = "expected INDEX=NAME[:b=VALUE][:optional], e.g. 0=dwi:b=1000 or 2=flair:optional"
    index, sep, rest = text.partition("=")
    if not sep or not index.strip().isdigit():
        raise ModelPackageError(f"--role {text!r}: {usage}")
    name, *flags = rest.split(":")
    name = name.strip()
    if not _ROLE_RE.fullmatch(name):
        raise ModelPackageError(
            f"--role {text!r}: role {name!r} must be a lower-case identifier (letters, digits, _; a letter first)"
        )
    b_value: float | None = None
    optional = False
    for flag in (f.strip() for f in flags):
        if flag == "optional":
            optional = True
        elif flag.startswith("b="):
            try:
                b_value = float(flag[2:])
            except ValueError:
                raise ModelPackageError(f"--role {text!r}: b-value {flag[2:]!r} is not a number; {usage}") from None
        else:
            raise ModelPackageError(f"--role {text!r}: unknown flag {flag!r}; {usage}")
    return int(index), name, b_value, optional


def input_roles(channel_names: Mapping[str, Any], overrides: Sequence[str] = ()) -> tuple[InputRole, ...]:
    """One input role per nnU-Net channel, in channel order.

    Args:
        channel_names: ``channel_names`` of dataset.json (``{"0": "DWI", "1": "ADC"}``).
        overrides: ``--role`` options (:func:`parse_role`).

    Raises:
        ModelPackageError: the channels are not numbered 0..N-1, an override names no
            channel, the reference (channel 0) is made optional, or two channels get one role.
    """
    try:
        channels = sorted((int(k), str(v)) for k, v in channel_names.items())
    except (TypeError, ValueError):
        raise ModelPackageError(
            f"dataset.json: channel_names keys must be channel numbers, got {list(channel_names)}"
        ) from None
    if not channels or [c for c, _ in channels] != list(range(len(channels))):
        raise ModelPackageError(f"dataset.json: channel_names must number the channels 0..N-1, got {dict(channels)}")
    roles = [InputRole(c, name, role_name(name)) for c, name in channels]
    for text in overrides:
        index, name, b_value, optional = parse_role(text)
        if index >= len(roles):
            raise ModelPackageError(f"--role {text!r}: the model has {len(roles)} channel(s), 0..{len(roles) - 1}")
        roles[index] = InputRole(index, roles[index].source, name, b_value, optional)
    if roles[0].optional:
        raise ModelPackageError(
            "--role: channel 0 is the reference series (results live on its grid); it cannot be optional"
        )
    seen: dict[str, int] = {}
    for r in roles:
        if r.role in seen:
            raise ModelPackageError(
                f"channels {seen[r.role]} and {r.channel} both become role {r.role!r}; "
                f"name one with --role {r.channel}=OTHER"
            )
        seen[r.role] = r.channel
    return tuple(roles)


def _code_ref(key: str) -> str | dict[str, str]:
    """A concept for model.yaml: the key of CODES, or the concept itself from EXTRA_CODES."""
    if key in CODES:
        return key
    entry = EXTRA_CODES[key]
    return {"value": entry.value, "meaning": entry.meaning, "scheme": entry.scheme}


def _split_side(name: str) -> tuple[list[str], str | None]:
    words = _words(name)
    if len(words) > 1 and words[0] in _SIDES:
        return words[1:], words[0]
    if len(words) > 1 and words[-1] in _SIDES:
        return words[:-1], words[-1]
    return words, None


def _display(words: list[str], side: str | None, fallback: str) -> str:
    text = " ".join(([side] if side else []) + words) or fallback
    return text[:1].upper() + text[1:]


def _abnormal_type(code: Code) -> bool:
    abnormal = {k.type for k in WELL_KNOWN.values() if k.category == _ABNORMAL}
    for key in abnormal:
        entry = CODES.get(key) or EXTRA_CODES[key]
        if (entry.scheme, entry.value) == (code.scheme, code.value):
            return True
    return False


def _lookup_codes(codes: Mapping[Any, Any], value: int, name: str) -> tuple[Any, dict[str, Any] | None]:
    for key in (value, str(value), name, "_".join(_words(name))):
        if key in codes:
            return key, codes[key]
    return None, None


def map_labels(
    labels: Mapping[str, Any], codes: Mapping[Any, Any] | None = None, *, where: str = "--codes"
) -> tuple[tuple[ImportedLabel, ...], list[str]]:
    """The ``labels:`` of model.yaml from dataset.json's labels (name -> value).

    Background (0) and nnU-Net's ``ignore`` label are left out. Each label gets its
    codes from ``codes`` (keyed by the label's name in dataset.json, its normalised
    name or its value), else from :data:`WELL_KNOWN` (side from ``left``/``right`` at
    either end of the name), else the generic "Anatomical Structure".

    Returns:
        The labels in ascending value, and warnings (generic codes, ignored labels).

    Raises:
        ModelPackageError: region-based labels, a value that is not a positive
            integer, two names with one value, or a ``codes`` entry that is invalid
            or names no label.
    """
    codes = dict(codes or {})
    warnings: list[str] = []
    by_value: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, list | tuple):
            raise ModelPackageError(
                f"dataset.json: label {name!r} is a region ({value}); region-based models output overlapping "
                "regions, not classes, and the nnunet backend does not run them"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelPackageError(f"dataset.json: label {name!r} has the value {value!r}, not an integer")
        if value == 0:
            continue
        if name.lower() == "ignore":
            warnings.append(f"label {value} ({name!r}) is nnU-Net's ignore label (not predicted); left out")
            continue
        if value < 0:
            raise ModelPackageError(f"dataset.json: label {name!r} has the negative value {value}")
        if value in by_value:
            raise ModelPackageError(f"dataset.json: labels {by_value[value]!r} and {name!r} share the value {value}")
        by_value[value] = name
    if not by_value:
        raise ModelPackageError("dataset.json: no labels besides background; nothing to segment")
    used: set[Any] = set()
    generic: list[str] = []
    out: list[ImportedLabel] = []
    for index, (value, name) in enumerate(sorted(by_value.items())):
        words, side = _split_side(name)
        known = WELL_KNOWN.get("_".join(words))
        if known is None and side is not None:
            # "left" or "right" may be part of the structure's own name; try the whole name too
            whole = WELL_KNOWN.get("_".join(_words(name)))
            if whole is not None:
                known, words, side = whole, _words(name), None
        spec: dict[str, Any] = {
            "name": _display(words, side, name),
            "category": _code_ref(known.category if known else _ANATOMY),
            "type": _code_ref(known.type if known else _ANATOMY),
        }
        if side:
            spec["laterality"] = side
        spec["color"] = list(_PALETTE[index % len(_PALETTE)])
        if known and known.count_components:
            spec["count_components"] = True
        origin = "well-known name" if known else "generic"
        validated, anatomy = True, None
        key, entry = _lookup_codes(codes, value, name)
        if key is not None:
            used.add(key)
            spec, validated, anatomy, typed = _apply_entry(spec, entry, label=f"{where}: {key!r}")
            if typed:
                origin = "codes file"
        if origin == "generic":
            generic.append(f"{value} {name!r}")
        out.append(ImportedLabel(value, name, spec, validated, anatomy, origin))
    unused = [k for k in codes if k not in used]
    if unused:
        known_labels = ", ".join(f"{v} {n!r}" for v, n in sorted(by_value.items()))
        raise ModelPackageError(
            f"{where}: {unused} match no label of the model, or repeat one another key matched (labels: {known_labels})"
        )
    if generic:
        warnings.append(
            "no codes for the label(s) "
            + ", ".join(generic)
            + ": they carry the generic 'Anatomical Structure' (SCT 91723000); map them in a --codes file "
            "so that the SEG and SR say what they are"
        )
    return tuple(out), warnings


def _apply_entry(spec: dict[str, Any], entry: Any, *, label: str) -> tuple[dict[str, Any], bool, Any, bool]:
    """A codes-mapping entry over the automatic label spec: (spec, validated, anatomy, gave a type)."""
    if not isinstance(entry, Mapping):
        raise ModelPackageError(f"{label}: expected a mapping of {sorted(_CODES_FIELDS)}, got {entry!r}")
    unknown = set(entry) - _CODES_FIELDS
    if unknown:
        raise ModelPackageError(f"{label}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_CODES_FIELDS)}")
    spec = dict(spec)
    for k in ("name", "type", "category", "modifier", "laterality", "color", "count_components"):
        if k in entry:
            spec[k] = entry[k]
    for k in ("measure_mean_of", "mean_unit"):
        if k in entry:
            spec[k] = entry[k]
    if "laterality" in entry and entry["laterality"] is None:
        spec.pop("laterality")
    if "type" in entry and "category" not in entry:
        try:
            abnormal = _abnormal_type(Code.model_validate(entry["type"]))
        except (ValidationError, ValueError) as exc:
            raise ModelPackageError(f"{label}: type: {_first_error(exc)}") from exc
        spec["category"] = _code_ref(_ABNORMAL if abnormal else _ANATOMY)
    try:
        LabelSpec.model_validate(spec)
        anatomy = entry.get("anatomy")
        if anatomy is not None:
            Code.model_validate(anatomy)
    except (ValidationError, ValueError) as exc:
        raise ModelPackageError(f"{label}: {_first_error(exc)}") from exc
    validated = entry.get("validated", True)
    if not isinstance(validated, bool):
        raise ModelPackageError(f"{label}: validated: expected true or false, got {validated!r}")
    return spec, validated, anatomy, "type" in entry


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
    return str(exc)


def load_codes_file(path: str | Path) -> dict[Any, Any]:
    """A codes mapping from YAML: label name or value -> {type, category, laterality, color, name, validated, ...}.

    Raises:
        ModelPackageError: the file is missing, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelPackageError(f"--codes {path}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ModelPackageError(f"--codes {path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ModelPackageError(f"--codes {path}: expected a mapping of label name or value -> codes")
    return data


# -- sources --------------------------------------------------------------------------------------


def extract_zip(path: Path, dest: Path) -> None:
    """Extract a model zip into ``dest``; every member is checked before anything is written.

    Raises:
        ModelPackageError: the file is not a zip, or a member would land outside
            ``dest`` (absolute path, drive letter, ``..``) or is a link (zip-slip).
    """
    root = dest.resolve()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelPackageError(f"{path}: not a readable zip file ({exc})") from exc
    with archive:
        members = archive.infolist()
        for info in members:
            name = info.filename.replace("\\", "/")
            if (
                name.startswith("/")
                or re.match(r"[A-Za-z]:", name)
                or ".." in PurePosixPath(name).parts
                or root not in (root / name).resolve().parents
            ):
                raise ModelPackageError(
                    f"{path}: the member {info.filename!r} would be written outside the folder the archive is "
                    "extracted to (zip-slip); the archive is refused and nothing was extracted"
                )
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ModelPackageError(
                    f"{path}: the member {info.filename!r} is a symbolic link; the archive is refused and nothing "
                    "was extracted"
                )
        try:
            for info in members:
                target = root / info.filename.replace("\\", "/")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ModelPackageError(f"{path}: cannot extract {info.filename!r}: {exc}") from exc


def _is_results_folder(folder: Path) -> bool:
    return (folder / "plans.json").is_file() or any(p.is_dir() for p in folder.glob("fold_*"))


def find_results_folder(root: Path, configuration: str | None = None) -> Path:
    """The nnU-Net results folder (``Trainer__Plans__configuration``) at or below ``root``.

    ``root`` itself, or the folders up to three levels below it (a Dataset folder, an
    extracted zip). ``configuration`` picks one by its full name or its configuration
    part (``3d_fullres``) when there are several.

    Raises:
        ModelPackageError: none is found, or several and ``configuration`` does not pick one.
    """
    found: list[Path] = []
    if _is_results_folder(root):
        found.append(root)
    else:
        level = [root]
        for _ in range(3):
            below: list[Path] = []
            for folder in level:
                for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                    if sub.name.startswith((".", "__MACOSX")):
                        continue
                    (found if _is_results_folder(sub) else below).append(sub)
            level = below
    if configuration is not None:
        found = [f for f in found if f.name == configuration or f.name.split("__")[-1] == configuration]
    names = [str(f.relative_to(root)) or "." for f in found]
    if not found:
        hint = f" for --configuration {configuration}" if configuration else ""
        raise ModelPackageError(
            f"{root}: no nnU-Net v2 results folder{hint} (a Trainer__Plans__configuration folder with plans.json, "
            "dataset.json and fold_N/checkpoint_final.pth) in it or up to three folders below"
        )
    if len(found) > 1:
        raise ModelPackageError(
            f"{root}: several nnU-Net results folders: {names}; choose one with --configuration "
            "(its name or its configuration, e.g. 3d_fullres)"
        )
    return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelPackageError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelPackageError(f"{path}: expected a JSON object")
    return data


def _fold_key(name: str) -> tuple[bool, int, str]:
    f = name.removeprefix("fold_")
    return (not f.isdigit(), int(f) if f.isdigit() else 0, f)


def _folds(folder: Path, checkpoint: str, warnings: list[str]) -> list[int | str]:
    """The folds whose ``fold_N/<checkpoint>`` exists; ModelPackageError when none does."""
    fold_dirs = sorted((p for p in folder.glob("fold_*") if p.is_dir()), key=lambda p: _fold_key(p.name))
    folds: list[int | str] = []
    for d in fold_dirs:
        f = d.name.removeprefix("fold_")
        if (d / checkpoint).is_file():
            folds.append(int(f) if f.isdigit() else f)
        else:
            warnings.append(f"{d.name} has no {checkpoint}; left out")
    if not folds:
        others = sorted({p.name for d in fold_dirs for p in d.glob("*.pth")})
        if others:
            hint = f"the folds hold {others}; choose one with --checkpoint"
        elif fold_dirs:
            hint = "the fold folders hold no checkpoint (*.pth); copy the trained folds from the training machine"
        else:
            hint = "there are no fold_N folders; copy the trained folds from the training machine"
        raise ModelPackageError(f"{folder}: no checkpoint: no fold_N/{checkpoint}; {hint}")
    return folds


def _postprocessing(folder: Path, folds: Sequence[int | str]) -> str | None:
    """Where the backend will find nnU-Net's postprocessing.pkl for these folds, relative to the folder."""
    joined = "_".join(str(f) for f in folds)
    for relative in ("postprocessing.pkl", f"crossval_results_folds_{joined}/postprocessing.pkl"):
        if (folder / relative).is_file():
            return relative
    return None


def _slug(text: str) -> str:
    return "-".join(_words(text)) or "imported-model"


# -- the import -----------------------------------------------------------------------------------


def _check_target(out: Path, source: Path, force: bool) -> None:
    src = source.resolve()
    dst = out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ModelPackageError(f"--out {out}: the package cannot be written into, over or above its source {source}")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ModelPackageError(f"--out {out} exists; choose another folder, or --force to replace that model package")
    if not out.is_dir() or out.is_symlink():
        raise ModelPackageError(f"--out {out} exists and is not a folder; --force replaces only a model package folder")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ModelPackageError(
            f"--out {out} is a folder with files but no {MANIFEST_NAME}; --force replaces only a model package"
        )


def _copy_folder(src: Path, dst: Path, folds: Sequence[int | str], checkpoint: str, *, move: bool) -> None:
    """The results folder's own files, the used folds' checkpoint (and debug.json), crossval postprocessing."""
    transfer = shutil.move if move else shutil.copy2
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            transfer(str(f), str(dst / f.name))
    for fold in folds:
        (dst / f"fold_{fold}").mkdir()
        for name in (checkpoint, "debug.json"):
            if (src / f"fold_{fold}" / name).is_file():
                transfer(str(src / f"fold_{fold}" / name), str(dst / f"fold_{fold}" / name))
    for cv in sorted(p for p in src.glob("crossval_results_folds_*") if p.is_dir()):
        for name in ("postprocessing.pkl", "postprocessing.json", "summary.json"):
            if (cv / name).is_file():
                (dst / cv.name).mkdir(exist_ok=True)
                transfer(str(cv / name), str(dst / cv.name / name))


def import_nnunet(
    source: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "1.0.0",
    intended_use: str | None = None,
    codes: Mapping[Any, Any] | None = None,
    codes_origin: str = "--codes",
    roles: Sequence[str] = (),
    configuration: str | None = None,
    checkpoint: str = DEFAULT_CHECKPOINT,
    orientation: str | None = None,
    force: bool = False,
) -> ImportResult:
    """Make a pacs-node model package from an nnU-Net v2 results folder, its Dataset folder, or its zip.

    Args:
        source: the results folder, the Dataset folder holding it, or ``nnUNetv2_export_model_to_zip``'s zip.
        out: the package folder to write.
        name, version: the model's name (default: from the Dataset folder) and version.
        intended_use: what the model is for (default :data:`DEFAULT_INTENDED_USE`).
        codes: label name or value -> codes entry (:func:`load_codes_file`); ``codes_origin``
            names it in error messages.
        roles: ``--role`` options (:func:`parse_role`) renaming channels.
        configuration: which results folder, when the source holds several.
        checkpoint: the checkpoint file of each fold.
        orientation: DICOMOrient code the model was trained in (``RAS`` ...), None: as the series lies.
        force: replace ``out`` when it is a model package.

    Raises:
        ModelPackageError: the source is not an nnU-Net v2 model (no results folder, no
            dataset.json or plans.json, no checkpoint, region-based labels), a zip member
            leaves the extraction folder, a codes entry or role is invalid, ``out``
            exists without ``force``, or the written package does not validate.
    """
    source = Path(source)
    out = Path(out)
    if orientation is not None:
        orientation = orientation.strip().upper()
        pairs = sorted(next((k for k, pair in enumerate(("LR", "PA", "SI")) if c in pair), -1) for c in orientation)
        if pairs != [0, 1, 2]:
            raise ModelPackageError(
                f"--orientation {orientation!r}: expected three letters, one of L/R, P/A and S/I each (e.g. RAS, LPS)"
            )
    if not source.exists():
        raise ModelPackageError(f"{source}: no such file or folder")
    _check_target(out, source, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        is_zip = source.is_file()
        if is_zip:
            extract_zip(source, work / "extracted")
            root = work / "extracted"
        elif source.is_dir():
            root = source
        else:
            raise ModelPackageError(f"{source}: neither a folder nor a zip file")
        folder = find_results_folder(root, configuration)
        shown = f"{source.name}:{folder.relative_to(root).as_posix()}" if is_zip else str(folder)
        for required in ("dataset.json", "plans.json"):
            if not (folder / required).is_file():
                raise ModelPackageError(
                    f"{shown}: missing {required}; nnU-Net writes it beside the fold_N folders of every results "
                    "folder: copy the whole Trainer__Plans__configuration folder"
                )
        dataset = _read_json(folder / "dataset.json")
        _read_json(folder / "plans.json")
        if dataset.get("regions_class_order") is not None:
            raise ModelPackageError(
                f"{shown}: dataset.json has regions_class_order: a region-based model; the nnunet backend runs "
                "models whose outputs are classes"
            )
        warnings: list[str] = []
        channel_names = dataset.get("channel_names", dataset.get("modality"))
        if not isinstance(channel_names, dict):
            raise ModelPackageError(f"{shown}/dataset.json: no channel_names (the model's input channels)")
        input_list = input_roles(channel_names, roles)
        raw_labels = dataset.get("labels")
        if not isinstance(raw_labels, dict):
            raise ModelPackageError(f"{shown}/dataset.json: no labels (name -> value)")
        labels, label_warnings = map_labels(raw_labels, codes, where=codes_origin)
        folds = _folds(folder, checkpoint, warnings)
        warnings += label_warnings
        pp = _postprocessing(folder, folds)

        dataset_dir = folder.parent.name if re.match(r"Dataset\d+_", folder.parent.name) else None
        folder_name = folder.name if folder != work / "extracted" else "nnunet"
        package = work / "package"
        package.mkdir()
        _copy_folder(folder, package / folder_name, folds, checkpoint, move=is_zip)
        checksums: dict[str, str] = {}
        for relative in [
            "plans.json",
            "dataset.json",
            *(f"fold_{f}/{checkpoint}" for f in folds),
            *([pp] if pp else []),
        ]:
            checksums[f"{folder_name}/{relative}"] = sha256_file(package / folder_name / relative)

        model_name = name or _slug(dataset_dir or str(dataset.get("name") or folder_name))
        manifest = _manifest(
            name=model_name,
            version=version,
            intended_use=intended_use or DEFAULT_INTENDED_USE,
            description=f"nnU-Net v2 results folder {shown}, imported by pacs-node models import on "
            f"{_dt.date.today().isoformat()}",
            roles=input_list,
            labels=labels,
            folder=folder_name,
            folds=folds,
            checkpoint=checkpoint,
            orientation=orientation,
            checksums=checksums,
        )
        (package / MANIFEST_NAME).write_text(
            yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8"
        )
        result = ImportResult(
            package=out,
            source=source,
            source_folder=shown,
            folder=folder_name,
            manifest=manifest,
            roles=input_list,
            labels=labels,
            folds=tuple(folds),
            checkpoint=checkpoint,
            checksums=checksums,
            postprocessing=f"{folder_name}/{pp}" if pp else None,
            warnings=tuple(warnings),
        )
        (package / "MODEL_CARD.md").write_text(_card(result), encoding="utf-8")
        ModelPackage(package)  # validates the manifest and that every folder it names is there
        _put_in_place(package, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.debug(
        "imported nnU-Net model %s into %s: %d label(s), folds %s, %d role(s)",
        shown,
        out,
        len(labels),
        list(folds),
        len(input_list),
    )
    return result


class _Dumper(yaml.SafeDumper):
    """model.yaml as a person writes it: lists of scalars on one line (``color: [230, 25, 75]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, list | dict) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def _put_in_place(package: Path, out: Path, work: Path) -> None:
    """Move the finished package to ``out``, replacing an old package only once the new one is complete."""
    old = work / "replaced"
    if out.exists():
        out.rename(old)
    try:
        package.rename(out)
    except OSError as exc:
        if old.exists():
            old.rename(out)
        raise ModelPackageError(f"--out {out}: cannot move the package into place ({exc})") from exc


def _manifest(
    *,
    name: str,
    version: str,
    intended_use: str,
    description: str,
    roles: Sequence[InputRole],
    labels: Sequence[ImportedLabel],
    folder: str,
    folds: Sequence[int | str],
    checkpoint: str,
    orientation: str | None,
    checksums: Mapping[str, str],
) -> dict[str, Any]:
    model: dict[str, Any] = {"backend": "nnunet", "folders": [folder], "folds": list(folds), "checkpoint": checkpoint}
    if orientation:
        model["orientation"] = orientation
    model["sha256"] = dict(checksums)
    manifest: dict[str, Any] = {
        "name": name,
        "version": version,
        "intended_use": intended_use,
        "demo": False,
        "description": description,
        "inputs": [r.manifest() for r in roles],
        "reference": roles[0].role,
        "labels": {label.value: label.spec for label in labels},
    }
    if any(not label.validated or label.anatomy is not None for label in labels):
        segments = []
        for label in labels:
            seg = {"labels": [label.value], **label.spec, "validated": label.validated}
            if label.anatomy is not None:
                seg["anatomy"] = label.anatomy
            segments.append(seg)
        manifest["segments"] = segments
    manifest["stages"] = [
        {"name": "segment", "label_map": {label.value: label.value for label in labels}, "model": model}
    ]
    return manifest


# -- reporting ------------------------------------------------------------------------------------


def _side(label: ImportedLabel) -> str:
    return str(label.spec.get("laterality") or "-")


def summary(result: ImportResult) -> str:
    """What was imported, in words: source, roles, folds, labels with codes, checksums, warnings."""
    m = result.manifest
    lines = [
        f"imported {result.source_folder}",
        f"  into        {result.package} (model.yaml validated)",
        f"  model       {m['name']} {m['version']} (demo: false)",
        f"  intended    {m['intended_use']}",
        "  inputs      "
        + ", ".join(
            f"channel {r.channel} {r.source!r} -> {r.role}"
            + (f" (b={r.b_value:g})" if r.b_value is not None else "")
            + (" (optional)" if r.optional else "")
            + (" (reference)" if r.channel == 0 else "")
            for r in result.roles
        ),
        f"  folds       {', '.join(str(f) for f in result.folds)} ({result.checkpoint})",
        f"  postprocess {result.postprocessing or 'none'}",
        "  labels (value, dataset.json name -> name, type / category, side, validated, from):",
    ]
    for label in result.labels:
        lines.append(
            f"    {label.value:>3}  {label.source} -> {label.spec['name']}: {label.describe()}, {_side(label)}, "
            f"{'yes' if label.validated else 'NO'}, {label.origin}"
        )
    lines.append("  sha256 (checked by the node before it loads the model):")
    lines += [f"    {digest}  {path}" for path, digest in result.checksums.items()]
    lines.append(
        "  Segments are validated by default, so they go to the PACS; mark a label `validated: false` in the "
        "--codes file to keep it out."
    )
    lines += [f"  warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _card(result: ImportResult) -> str:
    m = result.manifest
    rows = "\n".join(
        f"| {label.value} | {label.source} | {label.spec['name']} | {label.describe()} | {_side(label)} | "
        f"{'yes' if label.validated else 'no'} | {label.origin} |"
        for label in result.labels
    )
    sums = "\n".join(f"- `{path}`: `{digest}`" for path, digest in result.checksums.items())
    notes = "\n".join(f"- {w}" for w in result.warnings) or "- none"
    return f"""# {m["name"]} {m["version"]}

Imported nnU-Net v2 model: **imported, not validated by this node**. The importing
site is responsible for validating it for its intended use.

- Intended use: {m["intended_use"]}
- Source: {result.source_folder}
- Imported: {_dt.date.today().isoformat()} (`pacs-node models import`)
- Inputs (channel -> role): {", ".join(f"{r.channel} {r.source} -> {r.role}" for r in result.roles)}
- Folds: {", ".join(str(f) for f in result.folds)} ({result.checkpoint})
- Postprocessing: {result.postprocessing or "none"}

| value | dataset.json | name | type / category | side | validated | codes from |
|---|---|---|---|---|---|---|
{rows}

SHA-256 (the node checks them before loading the model):

{sums}

Import notes:

{notes}
"""
