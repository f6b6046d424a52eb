"""``pacs-node demo``: three phantom studies in, SEG/SR/key images out at a C-STORE SCP.

The demo runs once per session (tests/demo_support.py); these tests check what a
new user would look at: the table, the files, that the objects are valid DICOM
(dciodvfy, highdicom), that they belong to the study that was sent and that
the SEG matches the phantom truth.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pytest
from PIL import Image
from pydicom import dcmread

from tests.conftest import dciodvfy
from tests.demo_support import DemoRun

PIPELINES = ("stroke", "dentate", "kidney")


def test_every_pipeline_delivers_seg_sr_and_key_images(demo_run: DemoRun) -> None:
    assert set(demo_run.results) == set(PIPELINES)
    for name, r in demo_run.results.items():
        assert r.state == "done", (name, r.reason, demo_run.output)
        folder = demo_run.folder / name
        assert (folder / "seg.dcm").is_file() and (folder / "sr.dcm").is_file()
        keys = sorted(folder.glob("key-image-*.dcm"))
        assert keys and all(k.with_suffix(".png").is_file() for k in keys)
        # the results were received by the demo's own SCP, in the study that was sent
        for path in [folder / "seg.dcm", folder / "sr.dcm", *keys]:
            ds = dcmread(path)
            assert ds.StudyInstanceUID == r.study_uid
            assert "pacs-node" in str(ds.Manufacturer)


def test_demo_table_and_dice_against_the_phantom_truth(demo_run: DemoRun) -> None:
    out = demo_run.output
    for name in PIPELINES:
        assert name in out
    assert "Dice" in out and "DEMO" in out
    stroke = demo_run.results["stroke"]
    assert stroke.dice["Stroke lesion"] is not None and stroke.dice["Stroke lesion"] >= 0.8
    assert stroke.volumes_ml["Stroke lesion"] > 0
    dentate = demo_run.results["dentate"]
    assert dentate.dice["Left dentate nucleus"] >= 0.8 and dentate.dice["Right dentate nucleus"] >= 0.8
    kidney = demo_run.results["kidney"]
    assert kidney.dice["kidney"] >= 0.85
    for side in ("Right", "Left"):
        # each segment against the same segment built from the phantom truth: whole kidney per side, its parenchyma
        assert kidney.dice[f"{side} kidney"] >= 0.8 and kidney.dice[f"{side} renal parenchyma"] >= 0.8
    # the tumour is not validated by the model card: it did not go to the PACS, so no Dice is claimed for it
    assert not any("tumour" in name for name in kidney.dice)
    for r in demo_run.results.values():
        assert r.seconds["total"] > 0 and r.seconds["inference"] > 0
    assert (demo_run.folder / "demo.json").is_file()


@pytest.mark.parametrize("name", PIPELINES)
def test_demo_outputs_pass_dciodvfy_and_read_back(demo_run: DemoRun, name: str) -> None:
    folder = demo_run.folder / name
    for path in [folder / "seg.dcm", folder / "sr.dcm", *sorted(folder.glob("key-image-*.dcm"))]:
        dciodvfy(path)
    seg = hd.seg.segread(folder / "seg.dcm")
    assert seg.SeriesDescription and len(seg.SegmentSequence) >= 1
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName.startswith("demo-")
    sr = hd.sr.Comprehensive3DSR.from_dataset(dcmread(folder / "sr.dcm"))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert groups, "the SR carries volume measurements"
    png = Image.open(sorted(folder.glob("key-image-*.png"))[0])
    assert png.size[0] > 100 and png.size[1] > 100


def test_demo_command_refuses_a_missing_model(tmp_path: Path) -> None:
    """A user without the models gets a message that says how to make them."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "pipelines:\n  stroke:\n    model: " + str(tmp_path / "nowhere") + "\n"
        "routes:\n  - name: stroke-mr\n    pipeline: stroke\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs_node",
            "--config",
            str(cfg),
            "demo",
            "--out",
            str(tmp_path / "out"),
            "--pipelines",
            "stroke",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "python -m pacs_lab.training stroke" in proc.stderr
