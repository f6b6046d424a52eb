"""`pacs-node models import`: a trained nnU-Net v2 model (its results folder, the Dataset
folder above it, or the zip nnU-Net's own `nnUNetv2_export_model_to_zip` writes) becomes a
model package that runs in the node unchanged and predicts what the hand-made package of
the same folder predicts; its checkpoints' SHA-256 are checked before they are unpickled;
a zip whose members would leave the extraction folder is refused; label names become
codes, unknown ones get the generic code with a warning."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom.sr._concepts_dict as dicom_concepts
import pytest
import yaml

from inference.codes import CODES
from inference.errors import ModelPackageError
from inference.importer import (
    EXTRA_CODES,
    WELL_KNOWN,
    import_nnunet,
    input_roles,
    load_codes_file,
    map_labels,
    summary,
)
from inference.manifest import ModelPackage
from pacs_lab.tiny_nnunet import (
    DATASET_ID,
    DATASET_NAME,
    TRAINER_FOLDER,
    make_case,
    nnunet_command,
    nnunet_env,
    nnunet_package,
)
from tests.test_nnunet_dicom import phantom_series


def results_folder(tiny_root: Path) -> Path:
    return tiny_root / "nnUNet_results" / DATASET_NAME / TRAINER_FOLDER


@pytest.fixture(scope="module")
def series() -> list:
    image, _ = make_case(np.random.default_rng(4242))
    return phantom_series(image)


@pytest.fixture(scope="module")
def reference_labels(tiny_nnunet_root: Path, tmp_path_factory: pytest.TempPathFactory, series: list) -> np.ndarray:
    """What the hand-made package of the same folder predicts (mirroring on, as nnU-Net and the import default)."""
    from inference.pipeline import ModelRunner

    package = nnunet_package(tiny_nnunet_root, tmp_path_factory.mktemp("reference") / "pkg", mirroring=True)
    return ModelRunner(package, allow_gpu=False).run({"image": series}).labels.array


@pytest.fixture(scope="module")
def export_zip(tiny_nnunet_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported by nnU-Net's own `nnUNetv2_export_model_to_zip`.

    The export wants each fold's progress.png and validation/summary.json, which nnU-Net's trainer
    writes and the tiny model's plain training loop does not: placeholders stand in for them. A
    cross-validation postprocessing.pkl that changes nothing (no functions) rides along, as
    `nnUNetv2_find_best_configuration` would leave one.
    """
    root = tmp_path_factory.mktemp("export")
    dataset = root / "nnUNet_results" / DATASET_NAME
    shutil.copytree(tiny_nnunet_root / "nnUNet_results" / DATASET_NAME, dataset)
    fold = dataset / TRAINER_FOLDER / "fold_0"
    (fold / "progress.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (fold / "validation").mkdir()
    (fold / "validation" / "summary.json").write_text("{}")
    (dataset / TRAINER_FOLDER / "crossval_results_folds_0").mkdir()
    with open(dataset / TRAINER_FOLDER / "crossval_results_folds_0" / "postprocessing.pkl", "wb") as fh:
        pickle.dump(([], []), fh)
    out = root / "Dataset987_Tiny.zip"
    subprocess.run(
        [
            nnunet_command("nnUNetv2_export_model_to_zip"),
            "-d", str(DATASET_ID), "-o", str(out), "-c", "3d_fullres", "-f", "0",
        ],
        env=nnunet_env(root),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    return out


def run_package(package: Path, series: list) -> np.ndarray:
    from inference.pipeline import ModelRunner

    manifest = ModelPackage(package).manifest
    return ModelRunner(package, allow_gpu=False).run({manifest.reference: series}).labels.array


# -- a real model, imported three ways ------------------------------------------------------------------------------


def test_imported_results_folder_runs_like_the_hand_made_package(
    tiny_nnunet_root: Path, tmp_path: Path, series: list, reference_labels: np.ndarray
) -> None:
    result = import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "pkg", name="tiny-imported")
    m = ModelPackage(tmp_path / "pkg").manifest
    assert (m.name, m.version, m.demo) == ("tiny-imported", "1.0.0", False)
    assert "not validated by this node" in m.intended_use
    assert m.channel_roles == ["mr"] and m.reference == "mr"
    stage = m.stages[0]
    assert stage.label_map == {1: 1, 2: 2}
    assert stage.model.folds == (0,) and stage.model.checkpoint == "checkpoint_final.pth"
    digests = stage.model.sha256
    checkpoint = f"{TRAINER_FOLDER}/fold_0/checkpoint_final.pth"
    assert set(digests) == {checkpoint, f"{TRAINER_FOLDER}/plans.json", f"{TRAINER_FOLDER}/dataset.json"}
    assert digests == result.checksums and all(len(d) == 64 for d in digests.values())
    # only what the stage needs is copied: no validation predictions, no other checkpoints
    copied = sorted(p.relative_to(tmp_path / "pkg").as_posix() for p in (tmp_path / "pkg").rglob("*") if p.is_file())
    assert copied == sorted(
        ["MODEL_CARD.md", "model.yaml", checkpoint]
        + [f"{TRAINER_FOLDER}/{n}" for n in ("dataset.json", "dataset_fingerprint.json", "plans.json")]
    )
    assert "not validated by this node" in (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert np.array_equal(run_package(tmp_path / "pkg", series), reference_labels)

    text = summary(result)
    assert "channel 0 'MR' -> mr (reference)" in text and "folds       0 (checkpoint_final.pth)" in text
    assert digests[checkpoint] in text and "validated by default" in text


def test_imported_export_zip_runs_like_the_hand_made_package(
    export_zip: Path, tmp_path: Path, series: list, reference_labels: np.ndarray
) -> None:
    names = zipfile.ZipFile(export_zip).namelist()
    assert f"{DATASET_NAME}/{TRAINER_FOLDER}/fold_0/checkpoint_final.pth" in names, names
    result = import_nnunet(export_zip, tmp_path / "pkg")
    assert result.manifest["name"] == "dataset987-tiny"
    assert result.source_folder == f"{export_zip.name}:{DATASET_NAME}/{TRAINER_FOLDER}"
    pp = f"{TRAINER_FOLDER}/crossval_results_folds_0/postprocessing.pkl"
    assert result.postprocessing == pp and pp in result.checksums
    assert (tmp_path / "pkg" / pp).is_file()
    assert not (tmp_path / "pkg" / TRAINER_FOLDER / "fold_0" / "validation").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"], "the extraction folder is cleaned up"
    assert np.array_equal(run_package(tmp_path / "pkg", series), reference_labels)


def test_the_dataset_folder_gives_the_same_package(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    a = import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "a").manifest
    b = import_nnunet(results_folder(tiny_nnunet_root).parent, tmp_path / "b").manifest
    for m in (a, b):
        m.pop("description")
    assert a == b and a["name"] == "dataset987-tiny"


# -- checksums ------------------------------------------------------------------------------------------------------


def test_a_changed_checkpoint_is_refused_before_it_is_loaded(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    from inference.pipeline import ModelRunner

    import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "pkg")
    checkpoint = tmp_path / "pkg" / TRAINER_FOLDER / "fold_0" / "checkpoint_final.pth"
    with open(checkpoint, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelPackageError, match="SHA-256 mismatch.*import the model again"):
        ModelRunner(tmp_path / "pkg", allow_gpu=False)


def test_a_checkpoint_without_a_digest_or_a_bad_digest_is_refused(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    from inference.pipeline import ModelRunner

    import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "pkg")
    path = tmp_path / "pkg" / "model.yaml"
    manifest = yaml.safe_load(path.read_text())
    digests = manifest["stages"][0]["model"]["sha256"]
    del digests[f"{TRAINER_FOLDER}/fold_0/checkpoint_final.pth"]
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ModelPackageError, match="no digest for.*fold_0/checkpoint_final.pth"):
        ModelRunner(tmp_path / "pkg", allow_gpu=False)
    digests[f"{TRAINER_FOLDER}/plans.json"] = "abc"
    path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(ModelPackageError, match="not a SHA-256 digest"):
        ModelPackage(tmp_path / "pkg")


# -- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    ["../evil.txt", "Dataset1_X/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt", "..\\evil.txt", "link"],
)
def test_a_zip_with_paths_leaving_the_folder_is_refused(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Dataset1_X/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json", "{}")
        if member == "link":
            info = zipfile.ZipInfo("Dataset1_X/nnUNetTrainer__nnUNetPlans__3d_fullres/dataset.json")
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(member, "x")
    (tmp_path / "out").mkdir()
    with pytest.raises(ModelPackageError, match="zip-slip" if member != "link" else "symbolic link"):
        import_nnunet(archive, tmp_path / "out" / "pkg")
    assert not (tmp_path / "evil.txt").exists()
    assert list((tmp_path / "out").iterdir()) == [], "nothing written, the work folder removed"


def test_missing_dataset_json_no_checkpoint_and_an_existing_target_are_refused(
    tiny_nnunet_root: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src" / TRAINER_FOLDER
    shutil.copytree(results_folder(tiny_nnunet_root), src)

    (src / "dataset.json").rename(tmp_path / "dataset.json")
    with pytest.raises(ModelPackageError, match="missing dataset.json"):
        import_nnunet(src, tmp_path / "pkg")
    (tmp_path / "dataset.json").rename(src / "dataset.json")

    (src / "fold_0" / "checkpoint_final.pth").rename(src / "fold_0" / "checkpoint_best.pth")
    with pytest.raises(ModelPackageError, match=r"no checkpoint.*checkpoint_best.pth.*--checkpoint"):
        import_nnunet(src, tmp_path / "pkg")
    import_nnunet(src, tmp_path / "pkg", checkpoint="checkpoint_best.pth")
    assert (tmp_path / "pkg" / TRAINER_FOLDER / "fold_0" / "checkpoint_best.pth").is_file()

    with pytest.raises(ModelPackageError, match="exists; .*--force"):
        import_nnunet(src, tmp_path / "pkg", checkpoint="checkpoint_best.pth")
    result = import_nnunet(src, tmp_path / "pkg", checkpoint="checkpoint_best.pth", version="2.0.0", force=True)
    assert ModelPackage(result.package).manifest.version == "2.0.0"

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ModelPackageError, match="replaces only a model package"):
        import_nnunet(src, tmp_path / "notes", checkpoint="checkpoint_best.pth", force=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ModelPackageError, match="no nnU-Net v2 results folder"):
        import_nnunet(tmp_path / "notes", tmp_path / "pkg2")
    with pytest.raises(ModelPackageError, match="--orientation 'RRS'"):
        import_nnunet(src, tmp_path / "pkg3", orientation="RRS")


# -- labels, codes and roles ----------------------------------------------------------------------------------------


def test_unknown_label_names_get_the_generic_code_and_a_warning(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    result = import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "pkg")
    m = ModelPackage(tmp_path / "pkg").manifest
    assert [(s.name, s.type.value, s.category.value) for s in m.output_segments] == [
        ("Sphere", "91723000", "91723000"),
        ("Box", "91723000", "91723000"),
    ]
    assert all(s.validated for s in m.output_segments)
    assert any("1 'sphere', 2 'box'" in w and "Anatomical Structure" in w for w in result.warnings)
    assert "warning: no codes for the label(s) 1 'sphere', 2 'box'" in summary(result)


def test_a_codes_file_maps_labels_and_may_leave_one_unvalidated(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    codes = tmp_path / "codes.yaml"
    codes.write_text(
        "sphere: {type: neoplasm, color: [1, 2, 3], laterality: left}\n"
        "2: {name: Box mass, type: {value: '4147007', meaning: Mass, scheme: SCT}, anatomy: kidney, validated: false}\n"
    )
    result = import_nnunet(
        results_folder(tiny_nnunet_root),
        tmp_path / "pkg",
        codes=load_codes_file(codes),
        intended_use="site QA",
        orientation="ras",
    )
    assert not result.warnings
    m = ModelPackage(tmp_path / "pkg").manifest
    assert m.intended_use == "site QA" and m.stages[0].model.orientation == "RAS"
    sphere, box = m.output_segments
    assert (sphere.type.meaning, sphere.category.meaning, sphere.laterality, sphere.color) == (
        "Neoplasm",
        "Morphologically Abnormal Structure",
        "left",
        (1, 2, 3),
    )
    assert sphere.validated and sphere.count_components is False
    assert (box.name, box.type.value, box.category.meaning) == (
        "Box mass",
        "4147007",
        "Morphologically Abnormal Structure",
    )
    assert box.anatomy is not None and box.anatomy.meaning == "Kidney"
    assert box.validated is False
    assert "Box mass: Mass (SCT 4147007)" in summary(result) and ", NO, codes file" in summary(result)

    for text, error in [
        ("7: {type: kidney}\n", r"\[7\] match no label"),
        ("sphere: {type: kidny}\n", "unknown concept 'kidny'"),
        ("sphere: {colour: [1, 2, 3]}\n", r"unknown field\(s\) \['colour'\]"),
        ("sphere: {validated: maybe}\n", "validated: expected true or false"),
        ("- sphere\n", "expected a mapping"),
    ]:
        codes.write_text(text)
        with pytest.raises(ModelPackageError, match=error):
            import_nnunet(results_folder(tiny_nnunet_root), tmp_path / "bad", codes=load_codes_file(codes))


def test_well_known_names_get_codes_and_sides() -> None:
    labels, warnings = map_labels(
        {
            "background": 0,
            "kidney_left": 1,
            "right_kidney": 2,
            "Tumor": 3,
            "liver": 4,
            "Dentate Nucleus R": 5,
            "dentate_nucleus_right": 6,
            "spleen": 7,
            "ignore": 8,
        }
    )
    got = {lab.value: (lab.spec["name"], lab.spec["type"], lab.spec.get("laterality"), lab.origin) for lab in labels}
    assert got[1] == ("Left kidney", "kidney", "left", "well-known name")
    assert got[2] == ("Right kidney", "kidney", "right", "well-known name")
    assert got[3][:2] == ("Tumor", "neoplasm") and labels[2].spec["category"] == "morphologically_abnormal_structure"
    assert labels[2].spec["count_components"] is True
    assert got[4][1] == {"value": "10200004", "meaning": "Liver", "scheme": "SCT"}
    assert got[5][3] == "generic", "'R' is not read as a side"
    assert got[6] == ("Right dentate nucleus", "dentate_nucleus", "right", "well-known name")
    assert 8 not in got and any("ignore label" in w for w in warnings)
    assert any("5 'Dentate Nucleus R'" in w for w in warnings)
    with pytest.raises(ModelPackageError, match="region"):
        map_labels({"background": 0, "whole": [1, 2]})


@pytest.mark.parametrize("key", sorted(EXTRA_CODES))
def test_each_extra_code_matches_dicom(key: str) -> None:
    entry = EXTRA_CODES[key]
    found = [
        (meaning, set(cids))
        for table in dicom_concepts.concepts[entry.scheme].values()
        for code, (meaning, cids) in table.items()
        if code == entry.value
    ]
    assert any(meaning == entry.meaning and 7151 in cids for meaning, cids in found), (key, found)
    assert key not in CODES, "a concept belongs in one table"


def test_every_well_known_name_has_a_concept() -> None:
    for name, known in WELL_KNOWN.items():
        assert known.type in CODES or known.type in EXTRA_CODES, name
        assert known.category in CODES, name


def test_roles_follow_the_channels_and_may_be_renamed() -> None:
    roles = input_roles({"1": "ADC map", "0": "DWI", "2": "FLAIR"}, ["0=dwi:b=1000", "2=flair:optional"])
    assert [(r.channel, r.role, r.b_value, r.optional) for r in roles] == [
        (0, "dwi", 1000.0, False),
        (1, "adc_map", None, False),
        (2, "flair", None, True),
    ]
    for names, overrides, error in [
        ({"0": "CT", "1": "CT"}, [], "both become role 'ct'"),
        ({"0": "CT"}, ["1=pet"], "has 1 channel"),
        ({"0": "CT"}, ["0=ct:optional"], "cannot be optional"),
        ({"0": "CT"}, ["ct"], "expected INDEX=NAME"),
        ({"0": "CT"}, ["0=CT"], "lower-case identifier"),
        ({"0": "CT", "2": "PET"}, [], "0..N-1"),
    ]:
        with pytest.raises(ModelPackageError, match=error):
            input_roles(names, overrides)


# -- the command ----------------------------------------------------------------------------------------------------


def test_the_command_prints_the_summary_and_refuses_with_a_reason(tiny_nnunet_root: Path, tmp_path: Path) -> None:
    (tmp_path / "codes.yaml").write_text("box: {type: neoplasm}\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacs_node", "models", "import", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, PACS_NODE_DATA_DIR=str(tmp_path / "data")),
        )

    args = [str(results_folder(tiny_nnunet_root)), "--out", str(tmp_path / "pkg"), "--name", "tiny", "--role", "0=t1"]
    out = cli(*args, "--codes", str(tmp_path / "codes.yaml"), "--version", "3")
    assert out.returncode == 0, out.stderr
    assert "model       tiny 3 (demo: false)" in out.stdout
    assert "channel 0 'MR' -> t1 (reference)" in out.stdout
    assert "2  box -> Box: Neoplasm (SCT 108369006) / Morphologically Abnormal Structure" in out.stdout
    assert "warning: no codes for the label(s) 1 'sphere'" in out.stdout
    digests = yaml.safe_load((tmp_path / "pkg" / "model.yaml").read_text())["stages"][0]["model"]["sha256"]
    assert f"{digests[f'{TRAINER_FOLDER}/fold_0/checkpoint_final.pth']}  {TRAINER_FOLDER}/fold_0/" in out.stdout

    again = cli(*args)
    assert again.returncode == 1 and "exists; choose another folder, or --force" in again.stderr
