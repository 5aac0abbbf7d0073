"""Model bundles (``nnsnake export``, ``nnsnake predict -m model.zip``) and nnU-Net's layout (``--format nnunet``).

Everything here runs on the demo's finished workflow (the shared ``finished_demo`` fixture, so no extra training):
a bundle must predict exactly what the results folder predicts, a changed byte must be refused naming the file,
and the nnU-Net export must read back (through nnsnake's nnU-Net loaders) to the same segmentations.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnsnake
from nnsnake.cli import main
from nnsnake.inference.bundles import BundleError, extract_bundle, read_bundle_metadata
from nnsnake.inference.nnunet_models import load_checkpoint_safely
from nnsnake.jsonio import read_json

from .conftest import REPO

DEMO = "Dataset104_HippocampusDemo"
IMAGES = REPO / "examples" / DEMO / "imagesTs"
CASES = ("hippocampus_011", "hippocampus_185", "hippocampus_350")


@pytest.fixture(scope="module")
def demo_results(finished_demo: Path) -> Path:
    return finished_demo / "results" / DEMO


@pytest.fixture(scope="module")
def bundle(demo_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "model.zip"
    assert main(["export", "-m", str(demo_results), "-o", str(out), "--licence", "CC-BY-4.0", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def from_results(demo_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's test images predicted from the results folder (the reference of every round trip)."""
    out = tmp_path_factory.mktemp("pred") / "results"
    assert _predict(demo_results, out) == 0
    return out


def _predict(model: Path, out: Path, *extra: str) -> int:
    args = ["predict", "-i", str(IMAGES), "-o", str(out), "-m", str(model), "--device", "cpu", "--quiet"]
    return main([*args, "--threads", "1", "--no-mirroring", *extra])  # mirroring: 8x the time, same code path


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    return {c: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{c}.nii.gz"))) for c in CASES}


def _assert_same_segmentations(ours: Path, reference: Path) -> None:
    a, b = _arrays(ours), _arrays(reference)
    for case in CASES:
        np.testing.assert_array_equal(a[case], b[case], err_msg=case)
        x, y = sitk.ReadImage(str(ours / f"{case}.nii.gz")), sitk.ReadImage(str(reference / f"{case}.nii.gz"))
        assert x.GetSpacing() == y.GetSpacing() and x.GetOrigin() == y.GetOrigin()
    assert sum(int((v > 0).sum()) for v in b.values()) > 0  # something is segmented


# --------------------------------------------------------------------------------------------------------------
# nnsnake bundles


def test_bundle_predicts_exactly_what_the_results_folder_predicts(bundle, from_results, tmp_path):
    out = tmp_path / "from_zip"
    assert _predict(bundle, out) == 0
    _assert_same_segmentations(out, from_results)
    record, reference = read_json(out / "prediction.json"), read_json(from_results / "prediction.json")
    assert record["model_kind"] == "nnsnake model bundle" and record["bundle"] == str(bundle)
    for key in ("selected", "members", "configurations_run", "folds", "postprocessing_steps"):
        assert record[key] == reference[key], key
    assert record["licence"] == "CC-BY-4.0"


def test_bundle_metadata(bundle, demo_results):
    metadata = read_bundle_metadata(bundle)
    selection = read_json(demo_results / "selection.json")
    assert metadata["format"] == "nnsnake-bundle-1"
    assert metadata["nnsnake_version"] == nnsnake.__version__
    assert metadata["torch_version"] == str(torch.__version__)
    assert metadata["dataset_name"] == DEMO and metadata["licence"] == "CC-BY-4.0"
    assert datetime.fromisoformat(metadata["created"]).tzinfo is not None
    model = metadata["model"]
    assert model["selected"] == selection["selected"] and model["folds"] == selection["folds"]
    assert list(model["candidates"]) == [selection["selected"]]  # without --all: the selected candidate only
    assert metadata["selection"]["score"] == selection["score"]
    assert (
        metadata["cross_validation"][selection["selected"]]["score"]
        == selection["candidates"][selection["selected"]]["score"]
    )
    assert metadata["postprocessing_steps"] == read_json(demo_results / "postprocessing.json")["steps"]
    for stage in model["candidates"][selection["selected"]]["stages"]:
        budget = metadata["training"][stage]
        assert sorted(budget) == sorted(selection["folds"])
        assert all(f["epochs_trained"] == f["epochs_planned"] >= 1 for f in budget.values())
    with zipfile.ZipFile(bundle) as archive:
        names = archive.namelist()
        assert names[0] == "metadata.json"
        assert sorted(names[1:]) == sorted(metadata["files"])
        for name, listed in metadata["files"].items():
            data = archive.read(name)
            assert listed == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    weights = [n for n in names if n.endswith("model_final.pt")]
    n_stages = len(model["candidates"][selection["selected"]]["stages"])
    assert len(weights) == n_stages * len(selection["folds"])
    expected = {
        "dataset.json",
        "selection.json",
        "postprocessing.json",
        "fingerprint.json",
        "plans/nnUNetPlans.json",
    }
    assert expected <= set(names)
    assert any(n.startswith("crossval/") and n.endswith("summary.json") for n in names)


def _data_offset(path: Path, member: str) -> tuple[int, int]:
    """Start and length of a member's stored bytes in the zip file (after its local header)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length, info.compress_size


def test_flipped_byte_is_refused_naming_the_file(bundle, tmp_path, capsys):
    damaged = tmp_path / "damaged.zip"
    shutil.copy(bundle, damaged)
    member = next(n for n in read_bundle_metadata(bundle)["files"] if n.endswith("model_final.pt"))
    start, length = _data_offset(damaged, member)
    data = bytearray(damaged.read_bytes())
    data[start + length // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    out = tmp_path / "out"
    assert _predict(damaged, out) == 1
    err = capsys.readouterr().err
    assert f"member {member} is damaged" in err and str(damaged) in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def _rewritten(bundle: Path, target: Path, change: dict[str, bytes]) -> None:
    """A valid zip (fresh CRCs) with the bundle's members, some replaced or added, metadata.json unchanged."""
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(target, "w") as archive:
        for name in source.namelist():
            archive.writestr(name, change.get(name, source.read(name)))
        for name in set(change) - set(source.namelist()):
            archive.writestr(name, change[name])


def test_edited_or_added_members_are_refused(bundle, tmp_path):
    edited = tmp_path / "edited.zip"
    _rewritten(bundle, edited, {"postprocessing.json": b'{"steps": []}\n'})
    with pytest.raises(BundleError, match=r"member postprocessing.json does not match its SHA-256"):
        extract_bundle(edited, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing of a refused bundle is left behind
    added = tmp_path / "added.zip"
    _rewritten(bundle, added, {"weights/extra.pt": b"not listed"})
    with pytest.raises(BundleError, match=r"members metadata.json does not list: weights/extra.pt"):
        extract_bundle(added, tmp_path / "y")
    escaping = tmp_path / "escaping.zip"
    _rewritten(bundle, escaping, {"../outside.txt": b"x"})
    with pytest.raises(BundleError, match=r"names outside the bundle folder: \.\./outside.txt"):
        extract_bundle(escaping, tmp_path / "z")
    assert not (tmp_path / "outside.txt").exists()


def test_export_all_candidates(demo_results, tmp_path):
    out = tmp_path / "all.zip"
    assert main(["export", "-m", str(demo_results), "-o", str(out), "--all", "--quiet"]) == 0
    metadata = read_bundle_metadata(out)
    selection = read_json(demo_results / "selection.json")
    assert set(metadata["model"]["candidates"]) == set(selection["candidates"])
    configurations = {s for c in metadata["model"]["candidates"].values() for s in c["stages"]}
    for configuration in configurations:
        assert set(metadata["model"]["stages"][configuration]["checkpoints"]) == set(selection["folds"])
    assert metadata["licence"] is None


def test_not_a_bundle(tmp_path, capsys):
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("Dataset104_X/inference_information.json", "{}")
    assert _predict(plain, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert (
        "no metadata.json: not an nnsnake model bundle" in err
        and "nnUNetv2_install_pretrained_model_from_zip" in err
    )


# --------------------------------------------------------------------------------------------------------------
# nnU-Net's layout


@pytest.fixture(scope="module")
def nnunet_export(demo_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nnunet") / "nnUNet_results"
    assert main(["export", "--format", "nnunet", "-m", str(demo_results), "-o", str(out), "--quiet"]) == 0
    return out / DEMO


def test_nnunet_export_has_nnunets_layout_and_checkpoint_structure(nnunet_export, demo_results):
    selection = read_json(demo_results / "selection.json")
    information = read_json(nnunet_export / "inference_information.json")
    chosen = information["best_model_or_ensemble"]["selected_model_or_models"]
    assert [m["configuration"] for m in chosen] == selection["members"]
    assert information["folds"] == [int(f) for f in selection["folds"]]
    for member in chosen:
        folder = (
            nnunet_export / f"{member['trainer']}__{member['plans_identifier']}__{member['configuration']}"
        )
        for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
            assert (folder / name).is_file(), name
        for fold in selection["folds"]:
            path = folder / f"fold_{fold}" / "checkpoint_final.pth"
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain values only
            assert set(checkpoint) == {
                "network_weights",
                "grad_scaler_state",
                "logging",
                "_best_ema",
                "current_epoch",
                "init_args",
                "trainer_name",
                "inference_allowed_mirroring_axes",
            }
            assert checkpoint["trainer_name"] == "nnUNetTrainer"
            assert set(checkpoint["init_args"]) == {
                "plans",
                "configuration",
                "fold",
                "dataset_json",
                "device",
            }
            assert checkpoint["init_args"]["configuration"] == member["configuration"]
            assert checkpoint["init_args"]["fold"] == int(fold)
            assert checkpoint["init_args"]["device"] == torch.device("cpu")
            assert isinstance(checkpoint["inference_allowed_mirroring_axes"], tuple)
            weights = checkpoint["network_weights"]
            assert any(".all_modules." in k for k in weights) and any(
                k.startswith("decoder.encoder.") for k in weights
            )
            assert load_checkpoint_safely(path)["current_epoch"] == checkpoint["current_epoch"]
            assert (folder / f"fold_{fold}" / "progress.png").is_file()
    pp_file = Path(information["best_model_or_ensemble"]["postprocessing_file"])
    assert (nnunet_export.parent / pp_file).is_file() and (nnunet_export.parent / pp_file).with_suffix(
        ".json"
    ).is_file()


def test_nnunet_export_reads_back_to_the_same_segmentations(nnunet_export, from_results, tmp_path):
    """Predicting from the exported nnU-Net dataset folder (inference_information.json, every member, the
    postprocessing from postprocessing.json) equals predicting from the results folder."""
    out = tmp_path / "from_nnunet"
    assert _predict(nnunet_export, out) == 0
    _assert_same_segmentations(out, from_results)
    record = read_json(out / "prediction.json")
    assert record["model_kind"] == "nnU-Net dataset results folder"
    reference = read_json(from_results / "prediction.json")["postprocessing_steps"]
    assert [(s["operation"], s["labels"]) for s in record["postprocessing_steps"]] == [
        (s["operation"], s["labels"]) for s in reference
    ]


def test_nnunet_export_as_zip(demo_results, tmp_path):
    out = tmp_path / "nnunet.zip"
    assert main(["export", "--format", "nnunet", "-m", str(demo_results), "-o", str(out), "--quiet"]) == 0
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    assert f"{DEMO}/inference_information.json" in names
    assert all(
        n.startswith(f"{DEMO}/") for n in names
    )  # relative to nnUNet_results, as install_from_zip extracts
    assert any(n.endswith("/fold_0/checkpoint_final.pth") for n in names)
    assert not list(tmp_path.glob(".nnsnake_export_*"))  # the staging folder is gone
