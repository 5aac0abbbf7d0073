"""Models trained by nnU-Net v2: safe checkpoint loading and ``nnsnake predict -m <nnU-Net model folder>``.

The fixture (tests/fixtures/nnunet_model, made by make_fixture.py with nnunetv2 2.8.1) is a tiny 2d model of the
demo dataset trained by nnunetv2 on two folds, with nnUNetv2_predict's segmentations of the demo's 3 test images.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsnake.cli import main
from nnsnake.errors import CheckpointError, ModelFolderError, UnsafeCheckpointError
from nnsnake.inference import load_checkpoint
from nnsnake.inference.nnunet_models import (
    available_folds,
    check_checkpoint_safe,
    load_checkpoint_safely,
    nnunet_checkpoint_as_nnsnake,
    read_nnunet_model_folder,
)
from nnsnake.jsonio import read_json, write_json

from .conftest import FIXTURES, REPO

FIXTURE = FIXTURES / "nnunet_model"
MODEL = FIXTURE / "Dataset104_HippocampusDemo" / "nnUNetTrainer_anchorBench__nnUNetPlans__2d"
IMAGES = REPO / "examples" / "Dataset104_HippocampusDemo" / "imagesTs"
CASES = ("hippocampus_011", "hippocampus_185", "hippocampus_350")


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Custom:
    """A class of this test module: pickled by reference, so loading it would import and build it."""


def _crafted_checkpoint(path: Path, marker: Path, **save_kwargs) -> None:
    """An nnU-Net-looking checkpoint whose pickle runs a command and builds a foreign object when unpickled."""
    real = torch.load(MODEL / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    real["logging"] = {"payload": _RunsCode(marker), "other": _Custom()}
    torch.save(real, path, **save_kwargs)


def _model_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "Dataset104_HippocampusDemo" / MODEL.name
    shutil.copytree(MODEL, copy)
    return copy


def _predict(tmp_path: Path, model: Path, *extra: str, name: str = "out") -> tuple[int, Path]:
    out = tmp_path / name
    args = ["predict", "-i", str(IMAGES), "-o", str(out), "-m", str(model), "--device", "cpu", "--quiet"]
    return main([*args, "--threads", "1", *extra]), out


# --------------------------------------------------------------------------------------------------------------
# the safe loader


def test_real_nnunet_checkpoint_loads_with_its_numpy_scalars():
    path = MODEL / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(pickle.UnpicklingError):  # plain weights-only loading trips on the numpy scalars
        torch.load(path, map_location="cpu", weights_only=True)
    checkpoint = load_checkpoint_safely(path)
    assert checkpoint["trainer_name"] == "nnUNetTrainer_anchorBench"
    assert checkpoint["init_args"]["configuration"] == "2d"
    assert isinstance(checkpoint["init_args"]["device"], torch.device)
    assert isinstance(checkpoint["logging"]["ema_fg_dice"][0], np.floating)
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["network_weights"].values())
    converted = load_checkpoint(path)  # the same file in nnsnake's layout
    assert converted["init"]["inference_allowed_mirroring_axes"] == [0, 1]
    assert converted["init"]["source"] == "nnU-Net" and converted["init"]["configuration"] == "2d"


def test_no_mirroring_trainer_means_no_mirror_axes():
    checkpoint = {
        "network_weights": {},
        "trainer_name": "t",
        "init_args": {},
        "inference_allowed_mirroring_axes": None,
    }
    assert nnunet_checkpoint_as_nnsnake(checkpoint)["init"]["inference_allowed_mirroring_axes"] == []


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, legacy):
    marker = tmp_path / "marker"
    crafted = tmp_path / "checkpoint_final.pth"
    _crafted_checkpoint(crafted, marker, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint_safely(crafted)
    message = str(refused.value)
    assert str(crafted) in message and "system" in message  # posix.system (os.system) is named
    if not legacy:  # the scan lists every global; the legacy format stops at the first
        with pytest.raises(UnsafeCheckpointError, match="_Custom"):
            check_checkpoint_safe(crafted)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(crafted)  # nnsnake's own loader goes through the same gate
    assert not marker.exists()
    # the file really is armed: an unrestricted load would have run it (proves the test tests something)
    torch.load(crafted, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_predict_refuses_a_model_folder_with_a_crafted_fold(tmp_path, capsys):
    model = _model_copy(tmp_path)
    marker = tmp_path / "marker"
    _crafted_checkpoint(model / "fold_1" / "checkpoint_final.pth", marker)
    status, out = _predict(tmp_path, model)
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "fold_1/checkpoint_final.pth: refused, nothing of it was run" in err
    assert "posix.system" in err and "test_nnunet_models._Custom" in err
    assert not marker.exists()
    assert not out.exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------------------------
# predicting with the nnU-Net model folder


def _agreement(ours: Path, reference: Path) -> float:
    a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(reference))
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == pytest.approx(b.GetSpacing(), abs=1e-6)
    assert a.GetOrigin() == pytest.approx(b.GetOrigin(), abs=1e-6)
    assert a.GetDirection() == pytest.approx(b.GetDirection(), abs=1e-6)
    x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    return float(np.mean(x == y))


@pytest.mark.parametrize(
    ("reference", "extra", "folds"),
    [
        ("fold0", ["--folds", "0"], ["0"]),
        ("ensemble", [], ["0", "1"]),  # default: every fold_<k> present
        ("fold0_best", ["--folds", "0", "--checkpoint", "best"], ["0"]),
    ],
)
def test_predict_reproduces_nnunetv2_predict(tmp_path, capsys, reference, extra, folds):
    status, out = _predict(tmp_path, MODEL, *extra)
    assert status == 0, capsys.readouterr().err
    record = read_json(out / "prediction.json")
    assert record["folds"] == folds and record["model_kind"] == "nnU-Net trained-model folder"
    assert record["trainer"] == "nnUNetTrainer_anchorBench" and record["postprocessing_steps"] is None
    assert record["checkpoint"] == ("checkpoint_best.pth" if "best" in extra else "checkpoint_final.pth")
    foreground = 0
    for case in CASES:
        expected = FIXTURE / "reference" / reference / f"{case}.nii.gz"
        assert _agreement(out / f"{case}.nii.gz", expected) >= 0.999
        foreground += int((sitk.GetArrayFromImage(sitk.ReadImage(str(expected))) > 0).sum())
    assert foreground > 0  # the fixture model segments something, so agreement is not all background


def test_default_folds_leave_fold_all_out(tmp_path):
    model = _model_copy(tmp_path)
    shutil.copytree(model / "fold_0", model / "fold_all")
    (model / "fold_5").mkdir()  # no checkpoint: not a fold to use
    assert available_folds(model, "checkpoint_final.pth") == ["0", "1"]
    folder = read_nnunet_model_folder(model)
    assert folder.folds == ["0", "1"] and folder.configuration == "2d"
    assert read_nnunet_model_folder(model, ["all"]).checkpoints == [
        model / "fold_all" / "checkpoint_final.pth"
    ]


# --------------------------------------------------------------------------------------------------------------
# folders that are not models


def test_wrong_folders_get_one_clear_error(tmp_path, capsys):
    status, out = _predict(tmp_path, IMAGES.parent)  # a raw dataset
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and not out.exists()
    assert "is not a finished nnsnake results folder" in err and "nor an nnU-Net trained-model folder" in err
    assert "<Trainer>__<Plans>__<configuration>" in err
    # nnUNet_results/<Dataset> without inference_information.json: the error points at the model folder inside
    model = _model_copy(tmp_path)
    with pytest.raises(ModelFolderError, match=f"did you mean .*{MODEL.name}"):
        main_error(tmp_path, model.parent)
    with pytest.raises(ModelFolderError, match="fold_3/checkpoint_final.pth"):
        main_error(tmp_path, MODEL, ["--folds", "0", "3"])
    (model / "plans.json").unlink()
    with pytest.raises(ModelFolderError, match="not a finished nnsnake results folder"):
        main_error(tmp_path, model)


def main_error(tmp_path: Path, model: Path, extra: list[str] | None = None) -> None:
    """Run ``nnsnake --traceback predict`` so that the error itself reaches the test."""
    main(
        [
            "--traceback",
            "predict",
            "-i",
            str(IMAGES),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(model),
            *(extra or []),
        ]
    )


def test_checkpoint_choice():
    with pytest.raises(ModelFolderError, match="checkpoint 'latest'"):
        read_nnunet_model_folder(MODEL, checkpoint="latest")
    checkpoint = read_nnunet_model_folder(MODEL, ["1"], "best").checkpoints
    assert checkpoint == [MODEL / "fold_1" / "checkpoint_best.pth"]


def test_broken_checkpoint_is_named(tmp_path):
    broken = tmp_path / "checkpoint_final.pth"
    broken.write_bytes((MODEL / "fold_0" / "checkpoint_final.pth").read_bytes()[:5000])
    with pytest.raises(
        CheckpointError, match=f"{broken}: cannot be loaded as a weights-only torch checkpoint"
    ):
        load_checkpoint(broken)


# --------------------------------------------------------------------------------------------------------------
# nnsnake -> nnU-Net: weights, checkpoints, postprocessing files


def _fixture_network():
    from nnsnake.inference import network_from_checkpoint

    plans, dataset_json = read_json(MODEL / "plans.json"), read_json(MODEL / "dataset.json")
    network, _ = network_from_checkpoint(MODEL / "fold_0" / "checkpoint_final.pth", plans, "2d", dataset_json)
    return network, plans, dataset_json


def test_plain_unet_weights_get_nnunets_names_aliases_and_order_back():
    from nnsnake.inference.nnunet_models import nnunet_network_weights

    network, _, _ = _fixture_network()
    original = torch.load(MODEL / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    expected = original["network_weights"]
    exported = nnunet_network_weights(network)
    assert list(exported) == list(expected)  # DNA's 188 keys, aliases included, in DNA's order
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key


def test_resenc_nnunet_model_folder_loads(tmp_path):
    """An nnU-Net ResEnc model folder (DNA's 536-style aliased state dict) predicts: the weights load strictly."""
    from nnsnake.inference import network_from_checkpoint
    from nnsnake.inference.nnunet_models import nnunet_checkpoint, nnunet_network_weights
    from nnsnake.network import ResidualEncoderUNet, build_network

    plans, dataset_json = read_json(MODEL / "plans.json"), read_json(MODEL / "dataset.json")
    config = plans["configurations"]["2d"]
    arch = config["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = arch["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 2, 2, 2]
    kwargs["n_conv_per_stage_decoder"] = [1, 1, 1]
    del kwargs["n_conv_per_stage"]
    plans["plans_name"] = "nnUNetResEncUNetMPlans"
    torch.manual_seed(0)
    source = build_network(arch, 1, 3, deep_supervision=True)
    assert isinstance(source, ResidualEncoderUNet)
    weights = nnunet_network_weights(source)
    assert any(".all_modules." in k for k in weights) and any(
        k.startswith("decoder.encoder.") for k in weights
    )
    folder = tmp_path / "Dataset104_HippocampusDemo" / "nnUNetTrainer__nnUNetResEncUNetMPlans__2d"
    (folder / "fold_0").mkdir(parents=True)

    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", dataset_json)
    checkpoint = nnunet_checkpoint(
        weights,
        plans=plans,
        configuration="2d",
        dataset_json=dataset_json,
        fold=0,
        mirror_axes=(0, 1),
        epoch=1,
    )
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    network, _ = network_from_checkpoint(
        folder / "fold_0" / "checkpoint_final.pth", plans, "2d", dataset_json
    )
    for key, value in source.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key
    status, out = _predict(tmp_path, folder)
    assert status == 0 and all((out / f"{c}.nii.gz").is_file() for c in CASES)


def test_postprocessing_files_in_nnunets_format():
    import pickletools

    from nnsnake.inference.nnunet_models import (
        nnunet_postprocessing_json,
        nnunet_postprocessing_pickle,
    )

    decision = {
        "steps": [
            {"operation": "keep_largest_component", "labels": [1, 2], "scope": "all_foreground"},
            {"operation": "keep_largest_component", "labels": [2], "scope": "2"},
        ]
    }
    record = nnunet_postprocessing_json(decision)
    assert record["postprocessing_fns"] == ["remove_all_but_largest_component_from_segmentation"] * 2
    assert record["postprocessing_kwargs"] == [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]
    data = nnunet_postprocessing_pickle(decision)
    pickletools.dis(data, out=open(os.devnull, "w"))  # well-formed
    globals_named = [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
    assert (
        globals_named
        == [
            "nnunetv2.postprocessing.remove_connected_components remove_all_but_largest_component_from_segmentation"
        ]
        * 2
    )

    class _Stub(pickle.Unpickler):  # stands in for nnunetv2 (never imported by the product)
        def find_class(self, module, name):
            return f"{module}.{name}"

    import io

    functions, kwargs = _Stub(io.BytesIO(data)).load()
    assert (
        functions
        == [f"nnunetv2.postprocessing.remove_connected_components.{record['postprocessing_fns'][0]}"] * 2
    )
    assert kwargs == record["postprocessing_kwargs"]
    empty = nnunet_postprocessing_pickle({"steps": []})
    assert _Stub(io.BytesIO(empty)).load() == ([], [])


def test_nnunet_postprocessing_json_is_read_as_steps(tmp_path):
    from nnsnake.inference.nnunet_models import nnunet_postprocessing_steps

    path = tmp_path / "postprocessing.json"
    write_json(
        path,
        {
            "postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
            "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 1}],
        },
    )
    steps = nnunet_postprocessing_steps(path)
    assert [(s["operation"], s["labels"]) for s in steps] == [
        ("keep_largest_component", [1, 2]),
        ("keep_largest_component", [1]),
    ]
    write_json(path, {"postprocessing_fns": ["my_custom_fn"], "postprocessing_kwargs": [{}]})
    with pytest.raises(ModelFolderError, match="is not one nnsnake knows"):
        nnunet_postprocessing_steps(path)


# --------------------------------------------------------------------------------------------------------------
# nnU-Net dataset results folders: inference_information.json (find_best_configuration's choice)

DATASET = FIXTURE / "Dataset104_HippocampusDemo"


def _information() -> dict:
    return read_json(DATASET / "inference_information.json")


def test_inference_information_folder_reproduces_nnunetv2(tmp_path, capsys):
    """predict + (ensemble) + apply_postprocessing of nnunetv2 on the find_best_configuration choice."""
    status, out = _predict(tmp_path, DATASET)
    assert status == 0, capsys.readouterr().err
    information = _information()
    best = information["best_model_or_ensemble"]
    record = read_json(out / "prediction.json")
    assert record["model_kind"] == "nnU-Net dataset results folder"
    assert record["folds"] == [str(f) for f in information["folds"]]
    expected_members = [
        f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}"
        for m in best["selected_model_or_models"]
    ]
    assert record["members"] == expected_members
    assert record["postprocessing_file"].endswith("postprocessing.json")
    steps = read_json(record["postprocessing_file"])["postprocessing_kwargs"]
    assert len(record["postprocessing_steps"]) == len(steps)
    for case in CASES:
        assert (
            _agreement(out / f"{case}.nii.gz", FIXTURE / "reference" / "selected" / f"{case}.nii.gz") >= 0.999
        )


def test_inference_information_ensemble_reproduces_nnunetv2(tmp_path, capsys):
    """An ensemble choice (2d + 3d_fullres, the winner's postprocessing): nnUNetv2_ensemble's average."""
    copy = tmp_path / DATASET.name
    shutil.copytree(DATASET, copy)
    information = _information()
    information["best_model_or_ensemble"]["selected_model_or_models"] = [
        {"configuration": c, "trainer": "nnUNetTrainer_anchorBench", "plans_identifier": "nnUNetPlans"}
        for c in ("2d", "3d_fullres")
    ]

    write_json(copy / "inference_information.json", information)
    status, out = _predict(tmp_path, copy)
    assert status == 0, capsys.readouterr().err
    record = read_json(out / "prediction.json")
    assert len(record["members"]) == 2 and record["selected"].startswith("ensemble___")
    for case in CASES:
        reference = FIXTURE / "reference" / "ensemble_2d_3d_fullres_pp" / f"{case}.nii.gz"
        assert _agreement(out / f"{case}.nii.gz", reference) >= 0.999


def test_inference_information_needs_postprocessing_json_never_the_pickle(tmp_path, capsys):
    copy = tmp_path / DATASET.name
    shutil.copytree(DATASET, copy)
    (pp_json,) = copy.glob("**/postprocessing.json")
    pp_json.unlink()
    # nnU-Net writes a postprocessing.pkl beside the JSON; this one runs a command if anything unpickles it
    marker = tmp_path / "unpickled"
    pp_json.with_suffix(".pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    status, out = _predict(tmp_path, copy)
    err = capsys.readouterr().err
    assert (
        status == 1
        and "postprocessing.json" in err
        and "never the pickle" in err
        and "--no-postprocessing" in err
    )
    assert not out.exists()
    status, out = _predict(tmp_path, copy, "--no-postprocessing", name="no_pp")
    assert status == 0 and read_json(out / "prediction.json")["postprocessing_steps"] is None
    assert not marker.exists()  # the pickle was never loaded


def _random_nnunet_fold(
    folder: Path, plans: dict, configuration: str, dataset_json: dict, n_inputs: int
) -> None:
    from nnsnake.inference.nnunet_models import nnunet_checkpoint, nnunet_network_weights
    from nnsnake.network import build_network
    from nnsnake.planning import resolve_configuration

    architecture = resolve_configuration(plans, configuration)["architecture"]
    network = build_network(architecture, n_inputs, 3, deep_supervision=True)
    checkpoint = nnunet_checkpoint(
        nnunet_network_weights(network),
        plans=plans,
        configuration=configuration,
        dataset_json=dataset_json,
        fold=0,
        mirror_axes=(0, 1, 2),
        epoch=1,
    )
    (folder / "fold_0").mkdir(parents=True)
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", dataset_json)


def test_nnunet_cascade_runs_its_lowres_sibling_first(tmp_path, capsys):
    """3d_cascade_fullres reads the 3d_lowres folder's segmentations (two one-hot channels more at its input)."""
    import copy

    plans, dataset_json = read_json(MODEL / "plans.json"), read_json(MODEL / "dataset.json")
    fullres = plans["configurations"]["3d_fullres"]
    fullres["architecture"]["arch_kwargs"]["features_per_stage"] = [4, 8, 16, 32]
    lowres = copy.deepcopy(fullres)
    lowres.update(data_identifier="nnUNetPlans_3d_lowres", next_stage=["3d_cascade_fullres"])
    plans["configurations"]["3d_lowres"] = lowres
    plans["configurations"]["3d_cascade_fullres"] = {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }
    dataset = tmp_path / "Dataset104_HippocampusDemo"
    torch.manual_seed(0)
    _random_nnunet_fold(dataset / "T__nnUNetPlans__3d_lowres", plans, "3d_lowres", dataset_json, 1)
    cascade = dataset / "T__nnUNetPlans__3d_cascade_fullres"
    _random_nnunet_fold(cascade, plans, "3d_cascade_fullres", dataset_json, 3)
    status, out = _predict(tmp_path, cascade, "--no-mirroring")
    assert status == 0, capsys.readouterr().err
    record = read_json(out / "prediction.json")
    assert record["configurations_run"] == ["3d_lowres", "3d_cascade_fullres"]
    assert record["members"] == ["3d_cascade_fullres"]
    assert all((out / f"{c}.nii.gz").is_file() for c in CASES)
    shutil.rmtree(dataset / "T__nnUNetPlans__3d_lowres")
    with pytest.raises(
        ModelFolderError, match="needs the 3d_lowres model T__nnUNetPlans__3d_lowres beside it"
    ):
        main_error(tmp_path, cascade)
