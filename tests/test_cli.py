"""The ``nnsnake`` command line: predict with a results folder, verify a dataset, clean failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsnake.cli import main
from nnsnake.jsonio import read_json

from .test_evaluation import minimal_results


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A raw dataset and a results folder with plans, selection, postprocessing and two folds of models."""
    return minimal_results(tmp_path_factory.mktemp("cli"))


def test_predict_segments_a_folder(finished, tmp_path, capsys):
    dataset, results = finished
    out = tmp_path / "out"
    status = main(
        [
            "predict",
            "-i",
            str(dataset / "imagesTs"),
            "-o",
            str(out),
            "-m",
            str(results),
            "--device",
            "cpu",
            "--no-mirroring",
            "--threads",
            "1",
            "--save-probabilities",
            "--quiet",
            "-f",
            "0",
            "1",
        ]
    )
    assert status == 0
    assert "2 of 2 case(s) segmented with 3d_fullres" in capsys.readouterr().out
    for j in range(2):
        source = sitk.ReadImage(str(dataset / "imagesTs" / f"new_{j}_0000.nii.gz"))
        result = sitk.ReadImage(str(out / f"new_{j}.nii.gz"))
        assert result.GetSize() == source.GetSize()
        assert result.GetSpacing() == pytest.approx(source.GetSpacing(), abs=1e-6)
        assert result.GetOrigin() == pytest.approx(source.GetOrigin(), abs=1e-6)
        assert result.GetDirection() == pytest.approx(source.GetDirection(), abs=1e-6)
        assert np.load(out / f"new_{j}.npz")["probabilities"].shape[0] == 3
    record = read_json(out / "prediction.json")
    assert record["mirroring"] is False and record["folds"] == ["0", "1"] and record["device"] == "cpu"
    assert record["postprocessing_steps"][0]["operation"] == "keep_largest_component"
    # --continue finds everything done
    assert (
        main(
            [
                "predict",
                "-i",
                str(dataset / "imagesTs"),
                "-o",
                str(out),
                "-m",
                str(results),
                "--device",
                "cpu",
                "--no-mirroring",
                "--threads",
                "1",
                "--save-probabilities",
                "--continue",
                "--quiet",
            ]
        )
        == 0
    )
    assert "0 of 2 case(s)" in capsys.readouterr().out


def test_predict_bf16_agrees_with_full_precision(finished, tmp_path, capsys):
    """--bf16 runs the forward passes under bfloat16 autocast on the CPU; the labels barely change."""
    dataset, results = finished
    outputs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        out = tmp_path / name
        assert (
            main(
                [
                    "predict",
                    "-i",
                    str(dataset / "imagesTs"),
                    "-o",
                    str(out),
                    "-m",
                    str(results),
                    "--device",
                    "cpu",
                    "--no-mirroring",
                    "--threads",
                    "1",
                    "--quiet",
                    "-f",
                    "0",
                    *extra,
                ]
            )
            == 0
        )
        outputs[name] = out
    assert read_json(outputs["bf16"] / "prediction.json")["autocast"] is True
    assert read_json(outputs["fp32"] / "prediction.json")["autocast"] is None
    for j in range(2):
        full, half = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(o / f"new_{j}.nii.gz"))) for o in outputs.values()
        )
        assert full.shape == half.shape and np.mean(full == half) > 0.95


def test_autocast_flag_and_deprecated_bf16(finished, tmp_path, capsys):
    """--autocast bf16 on the CPU is what --bf16 did; --bf16 still works and says it is deprecated."""
    dataset, results = finished
    common = ["-i", str(dataset / "imagesTs"), "-m", str(results), "--device", "cpu", "--no-mirroring"]
    common += ["--threads", "1", "--quiet", "-f", "0"]
    assert main(["predict", *common, "-o", str(tmp_path / "new"), "--autocast", "bf16"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["predict", *common, "-o", str(tmp_path / "old"), "--bf16"]) == 0
    assert "--bf16 is deprecated; use --autocast bf16" in capsys.readouterr().err
    assert read_json(tmp_path / "new" / "prediction.json")["autocast"] == "bf16"
    for j in range(2):
        new, old = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / o / f"new_{j}.nii.gz")))
            for o in ("new", "old")
        )
        np.testing.assert_array_equal(new, old)
    with pytest.raises(SystemExit) as usage:
        main(["predict", *common, "-o", str(tmp_path / "x"), "--bf16", "--autocast", "off"])
    assert usage.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("input", "does not exist"),
        ("model", "not a finished nnsnake results folder"),
        ("folds", "fold_5"),
        ("device", "device 'gpu0'"),
    ],
)
def test_predict_fails_cleanly(finished, tmp_path, capsys, change, expected):
    dataset, results = finished
    args = {"-i": str(dataset / "imagesTs"), "-o": str(tmp_path / "out"), "-m": str(results)}
    extra = ["--device", "cpu", "--quiet"]
    if change == "input":
        args["-i"] = str(tmp_path / "nowhere")
    elif change == "model":
        args["-m"] = str(dataset)
    elif change == "folds":
        extra += ["--folds", "0", "5"]
    else:
        extra = ["--device", "gpu0", "--quiet"]
    status = main(["predict", *[x for pair in args.items() for x in pair], *extra])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("nnsnake predict: error: ") and expected in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # every check runs before anything is written


def test_export_fails_cleanly_and_writes_nothing(finished, tmp_path, capsys):
    dataset, results = finished
    out = tmp_path / "model.zip"
    assert main(["export", "-m", str(dataset), "-o", str(out)]) == 1  # a raw dataset, not results
    err = capsys.readouterr().err
    assert err.startswith("nnsnake export: error: ") and "not a finished nnsnake results folder" in err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())
    assert main(["export", "--format", "nnunet", "-m", str(results), "-o", str(tmp_path / "n")]) == 0
    assert main(["export", "--format", "nnunet", "-m", str(results), "-o", str(tmp_path / "n")]) == 1
    assert "Dataset990_Tiny exists; remove it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n"]  # no staging folder left behind


def test_export_then_predict_from_the_bundle(finished, tmp_path, capsys):
    """The tiny results folder round trip through a bundle and through nnU-Net's layout (fast; the demo's
    round trips are in test_bundles.py)."""
    dataset, results = finished
    images = ["-i", str(dataset / "imagesTs"), "--device", "cpu", "--quiet"]
    assert main(["export", "-m", str(results), "-o", str(tmp_path / "m.zip")]) == 0
    assert main(["export", "--format", "nnunet", "-m", str(results), "-o", str(tmp_path / "nn")]) == 0
    outputs = {}
    for name, model in (
        ("results", results),
        ("bundle", tmp_path / "m.zip"),
        ("nnunet", tmp_path / "nn" / "Dataset990_Tiny"),
    ):
        outputs[name] = tmp_path / f"out_{name}"
        assert main(["predict", *images, "-o", str(outputs[name]), "-m", str(model)]) == 0, (
            capsys.readouterr().err
        )
    cases = sorted(p.name for p in outputs["results"].glob("*.nii.gz"))
    assert cases
    for case in cases:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs["results"] / case)))
        for name in ("bundle", "nnunet"):
            np.testing.assert_array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[name] / case))), reference
            )


def test_verify_reports_ok_and_problems(finished, tmp_path, capsys):
    dataset, _ = finished
    assert main(["verify", str(dataset), "-o", str(tmp_path / "report.json")]) == 0
    assert "6 case(s), no problems" in capsys.readouterr().out
    assert read_json(tmp_path / "report.json")["ok"] is True
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    (broken / "labelsTr" / "tiny_000.nii.gz").unlink()
    assert main(["verify", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "tiny_000.nii.gz" in err and "label file is missing" in err


def test_console_module_exit_codes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnsnake.cli",
            "predict",
            "-i",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert missing.returncode == 1
    assert "nnsnake predict: error:" in missing.stderr and "Traceback" not in missing.stderr
    usage = subprocess.run(
        [sys.executable, "-m", "nnsnake.cli", "predict", "-o", "x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert usage.returncode == 2 and "-i/--input" in usage.stderr
