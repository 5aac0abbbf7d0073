"""Validation, cross-validation, ensembles, selection, postprocessing and prediction on new images, end to end.

A tiny raw dataset (six 16³ cases, three labels, rotated direction, non-zero origin) is preprocessed with a
hand-written plan (3d_fullres, 3d_lowres, 3d_cascade_fullres; a 2-stage U-Net with 4/8 features, 8³ patches),
each configuration gets two randomly initialised folds, and the workflow's evaluation steps run on CPU with
mirroring off. Random networks give arbitrary but deterministic segmentations, so the tests check the
machinery against independent computations (the raw-data inference path, numpy Dice, probability averages),
not segmentation quality.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsnake import evaluation
from nnsnake.evaluation import (
    EvaluationError,
    PredictionInputError,
    crossval,
    decide_postprocessing,
    ensemble_crossval,
    predict_folder,
    select,
    validate_fold,
    verify_prediction_inputs,
)
from nnsnake.jsonio import read_json, write_json

DATASET = "Dataset990_Tiny"
DATASET_JSON = {
    "channel_names": {"0": "MRI"},
    "labels": {"background": 0, "core": 1, "rim": 2},
    "numTraining": 6,
    "file_ending": ".nii.gz",
}
ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [2, 2],
        "n_conv_per_stage_decoder": [2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
CONFIGURATIONS = ("3d_fullres", "3d_lowres", "3d_cascade_fullres")
CASES = [f"tiny_{i:03d}" for i in range(6)]
SPLITS = [{"train": CASES[3:], "val": CASES[:3]}, {"train": CASES[:3], "val": CASES[3:]}]
FOLDS = ("0", "1")


def _config(spacing: list[float], data_identifier: str) -> dict:
    return {
        "data_identifier": data_identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [8, 8, 8],
        "median_image_size_in_voxels": [16, 16, 16],
        "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": ARCH,
        "batch_dice": False,
    }


PLANS = {
    "dataset_name": DATASET,
    "plans_name": "nnUNetPlans",
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
    "original_median_shape_after_transp": [16, 16, 16],
    "configurations": {
        "3d_fullres": _config([1.0, 1.0, 1.0], "nnUNetPlans_3d_fullres"),
        "3d_lowres": {
            **_config([2.0, 2.0, 2.0], "nnUNetPlans_3d_lowres"),
            "next_stage": "3d_cascade_fullres",
        },
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    },
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {
            "max": 3.0,
            "mean": 2.0,
            "median": 2.0,
            "min": 0.0,
            "percentile_00_5": 0.0,
            "percentile_99_5": 3.0,
            "std": 0.5,
        }
    },
}


# --------------------------------------------------------------------------------------------------------------
# the synthetic world (also used by test_cli.py)


def _direction(ax: float, az: float) -> tuple[float, ...]:
    cx, sx, cz, sz = math.cos(ax), math.sin(ax), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ rx).flatten())


def _write(array: np.ndarray, path: Path, spacing, origin, direction) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _case_arrays(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A bright core (1) in a rim (2) inside a zero border (so cropping happens), plus a small satellite blob."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
    radius = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
    seg = np.where(radius < 2.5, 1, np.where(radius < 4.5, 2, 0)).astype(np.uint8)
    seg[1:3, 1:3, 1:3] = 2
    image = (1.0 + seg + rng.normal(0, 0.3, shape)).astype(np.float32)
    border = np.zeros(shape, bool)
    border[1:-1, 1:-1, 1:-1] = True
    image[~border] = 0
    seg[~border] = 0
    return image, seg


def make_raw_dataset(root: Path) -> Path:
    """Raw dataset in nnU-Net layout with imagesTs of different spacing, origin and direction."""
    rng = np.random.default_rng(0)
    dataset = root / DATASET
    for i, case in enumerate(CASES):
        image, seg = _case_arrays(rng, (16, 16, 16))
        geometry = ((1.0, 1.0, 1.0), (3.0 * i, -20.0, 7.5), _direction(0.2 * i, 0.4))
        _write(image, dataset / "imagesTr" / f"{case}_0000.nii.gz", *geometry)
        _write(seg, dataset / "labelsTr" / f"{case}.nii.gz", *geometry)
    for j, shape in enumerate([(10, 15, 17), (12, 14, 13)]):
        image, _ = _case_arrays(rng, shape)
        _write(
            image,
            dataset / "imagesTs" / f"new_{j}_0000.nii.gz",
            (0.9, 1.1, 1.6),
            (-12.5, 40.0, 7.25 + j),
            _direction(0.35, 0.52 + j),
        )
    write_json(dataset / "dataset.json", DATASET_JSON)
    return dataset


def make_models(results: Path, seed: int = 0) -> None:
    """A randomly initialised ``model_final.pt`` per configuration and fold, in training's format."""
    from nnsnake.inference import num_input_channels
    from nnsnake.network import build_network
    from nnsnake.planning import resolve_configuration
    from nnsnake.training import MODEL_FINAL, MODEL_FORMAT

    for c, configuration in enumerate(CONFIGURATIONS):
        config = resolve_configuration(PLANS, configuration)
        n_inputs = num_input_channels(PLANS, config, DATASET_JSON)
        for fold in FOLDS:
            torch.manual_seed(seed + 10 * c + int(fold))
            network = build_network(config["architecture"], n_inputs, 3, deep_supervision=False)
            path = results / "training" / configuration / f"fold_{fold}" / MODEL_FINAL
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "format": MODEL_FORMAT,
                    "network_weights": network.state_dict(),
                    "init": {
                        "configuration": configuration,
                        "num_input_channels": n_inputs,
                        "num_outputs": 3,
                        "inference_allowed_mirroring_axes": [0, 1, 2],
                        "fold": fold,
                    },
                },
                path,
            )


def minimal_results(root: Path, selected: str = "3d_fullres") -> tuple[Path, Path]:
    """A results folder as the workflow leaves it, without running the evaluation steps (for CLI tests)."""
    dataset = make_raw_dataset(root / "raw")
    results = root / "results" / DATASET
    write_json(results / "plans.json", PLANS)
    make_models(results)
    write_json(
        results / "selection.json",
        {
            "selected": selected,
            "members": [selected],
            "folds": list(FOLDS),
            "dataset_json": DATASET_JSON,
            "crossval_folder": f"crossval/{selected}",
        },
    )
    write_json(
        results / "postprocessing.json",
        {"steps": [{"operation": "keep_largest_component", "labels": [1, 2], "scope": "all_foreground"}]},
    )
    return dataset, results


def _preprocess(dataset: Path, results: Path) -> dict[str, Path]:
    from nnsnake.preprocessing import preprocess_dataset

    folders = {}
    for configuration in ("3d_fullres", "3d_lowres"):
        folders[configuration] = results / "preprocessed" / configuration
        preprocess_dataset(
            dataset, DATASET_JSON, PLANS, configuration, folders[configuration], progress=False
        )
    folders["3d_cascade_fullres"] = folders["3d_fullres"]
    return folders


def _fold_dir(results: Path, configuration: str, fold: str) -> Path:
    return results / "training" / configuration / f"fold_{fold}"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The workflow's evaluation steps, run once: validate → crossval → ensembles → select → postprocess."""
    root = tmp_path_factory.mktemp("evaluation")
    dataset = make_raw_dataset(root / "raw")
    results = root / "results" / DATASET
    write_json(results / "plans.json", PLANS)
    write_json(results / "splits.json", SPLITS)
    make_models(results)
    preprocessed = _preprocess(dataset, results)
    next_stage = results / "training" / "3d_lowres" / "predicted_next_stage"
    common = dict(
        plans_path=results / "plans.json",
        dataset_dir=dataset,
        splits_path=results / "splits.json",
        settings={"device": "cpu", "mirroring": False, "threads": 1},
        progress=False,
    )
    validations = {}
    for configuration in CONFIGURATIONS:  # lowres before the cascade, which reads its next-stage predictions
        for fold in FOLDS:
            extra = {}
            if configuration == "3d_lowres":
                extra = dict(
                    next_stage_preprocessed_dir=preprocessed["3d_fullres"], next_stage_output_dir=next_stage
                )
            if configuration == "3d_cascade_fullres":
                extra = dict(previous_stage_dir=next_stage)
            validations[configuration, fold] = validate_fold(
                preprocessed[configuration],
                configuration=configuration,
                fold=fold,
                model_path=_fold_dir(results, configuration, fold) / "model_final.pt",
                output_dir=_fold_dir(results, configuration, fold) / "validation",
                **common,
                **extra,
            )
    crossvals = {
        c: crossval(
            [_fold_dir(results, c, f) / "validation" for f in FOLDS],
            dataset,
            results / "crossval" / c,
            splits_path=results / "splits.json",
        )
        for c in CONFIGURATIONS
    }
    from nnsnake.selection import candidate_names

    summaries = {c: results / "crossval" / c / "summary.json" for c in CONFIGURATIONS}
    for name in candidate_names(CONFIGURATIONS)[len(CONFIGURATIONS) :]:
        from nnsnake.selection import candidate_members

        a, b = candidate_members(name)
        ensemble_crossval(
            [results / "crossval" / a, [_fold_dir(results, b, f) / "validation" for f in FOLDS]],
            dataset,
            results / "crossval" / name,
        )
        summaries[name] = results / "crossval" / name / "summary.json"
    # reversed on purpose: select puts candidates into nnU-Net's order itself
    summaries = dict(reversed(list(summaries.items())))
    selection = select(
        summaries,
        results / "selection.json",
        results / "bootstrap.json",
        results / "bootstrap.png",
        n_bootstrap=200,
        seed=3,
        dataset_dir=dataset,
        plans_path=results / "plans.json",
    )
    postprocessing = decide_postprocessing(
        results / "selection.json", dataset, results / "postprocessing.json"
    )
    return dict(
        root=root,
        dataset=dataset,
        results=results,
        preprocessed=preprocessed,
        next_stage=next_stage,
        validations=validations,
        crossvals=crossvals,
        summaries=summaries,
        selection=selection,
        postprocessing=postprocessing,
    )


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _assert_same_geometry(a: Path, b: Path) -> None:
    image_a, image_b = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert image_a.GetSize() == image_b.GetSize()
    np.testing.assert_allclose(image_a.GetSpacing(), image_b.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image_a.GetOrigin(), image_b.GetOrigin(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image_a.GetDirection(), image_b.GetDirection(), rtol=0, atol=1e-6)


def _dice(reference: np.ndarray, prediction: np.ndarray, label: int) -> float:
    r, p = reference == label, prediction == label
    denominator = r.sum() + p.sum()
    return float("nan") if denominator == 0 else 2.0 * (r & p).sum() / denominator


# --------------------------------------------------------------------------------------------------------------
# validate


def test_validation_writes_val_cases_in_raw_geometry_with_probabilities(world):
    results, dataset = world["results"], world["dataset"]
    for (configuration, fold), info in world["validations"].items():
        folder = _fold_dir(results, configuration, fold) / "validation"
        val = SPLITS[int(fold)]["val"]
        assert sorted(p.name for p in folder.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in val]
        assert info["n_cases"] == 3 and info["configuration"] == configuration
        for case in val:
            label_file = dataset / "labelsTr" / f"{case}.nii.gz"
            _assert_same_geometry(folder / f"{case}.nii.gz", label_file)
            seg = _read(folder / f"{case}.nii.gz")
            probabilities = np.load(folder / f"{case}.npz")["probabilities"]
            assert probabilities.shape == (3, *seg.shape) and probabilities.dtype == np.float32
            np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
            np.testing.assert_array_equal(probabilities.argmax(0), seg)
            assert read_json(folder / f"{case}.json")["shape_before_cropping"] == [16, 16, 16]


def test_validation_summary_has_nnunet_fields_and_numpy_dice(world):
    results, dataset = world["results"], world["dataset"]
    folder = _fold_dir(results, "3d_fullres", "1") / "validation"
    summary = read_json(folder / "summary.json")
    assert set(summary) == {"metric_per_case", "mean", "foreground_mean"}
    assert set(summary["mean"]) == {"1", "2"}
    assert set(summary["foreground_mean"]) == {"Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref"}
    assert len(summary["metric_per_case"]) == 3
    per_label = {1: [], 2: []}
    for entry in summary["metric_per_case"]:
        assert Path(entry["reference_file"]).parent == dataset / "labelsTr"
        assert Path(entry["prediction_file"]).parent == folder
        reference, prediction = _read(Path(entry["reference_file"])), _read(Path(entry["prediction_file"]))
        for label in (1, 2):
            expected = _dice(reference, prediction, label)
            got = entry["metrics"][str(label)]["Dice"]
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, abs=1e-12)
            assert entry["metrics"][str(label)]["n_ref"] == int((reference == label).sum())
            per_label[label].append(expected)
    expected_mean = np.mean([np.nanmean(per_label[1]), np.nanmean(per_label[2])])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(expected_mean, abs=1e-12)
    assert (
        world["validations"]["3d_fullres", "1"]["foreground_mean_dice"] == summary["foreground_mean"]["Dice"]
    )


def test_validation_equals_prediction_from_raw_images(world):
    """The preprocessed (validation) path and the raw-image (inference) path give the same segmentation."""
    from nnsnake.inference import InferenceSettings, predict_from_raw

    results, dataset = world["results"], world["dataset"]
    case = SPLITS[0]["val"][1]
    out = world["root"] / "raw_path"
    predict_from_raw(
        {case: [dataset / "imagesTr" / f"{case}_0000.nii.gz"]},
        out,
        [_fold_dir(results, "3d_fullres", "0") / "model_final.pt"],
        PLANS,
        "3d_fullres",
        DATASET_JSON,
        settings=InferenceSettings(device="cpu", mirroring=False),
        progress=False,
    )
    np.testing.assert_array_equal(
        _read(out / f"{case}.nii.gz"),
        _read(_fold_dir(results, "3d_fullres", "0") / "validation" / f"{case}.nii.gz"),
    )


def test_lowres_writes_next_stage_at_fullres_shape_for_every_case(world):
    from nnsnake.preprocessing import load_case

    files = sorted(p.name for p in world["next_stage"].glob("*.npy"))
    assert files == [f"{c}.npy" for c in CASES]  # both folds together: every case out-of-fold
    for case in CASES:
        seg = np.load(world["next_stage"] / f"{case}.npy")
        data, _, _ = load_case(world["preprocessed"]["3d_fullres"], case)
        assert seg.shape == (1, *data.shape[1:]) and seg.dtype == np.uint8
        assert set(np.unique(seg)) <= {0, 1, 2}


def test_validation_removes_stale_cases_and_needs_previous_stage(world, tmp_path):
    results = world["results"]
    source = _fold_dir(results, "3d_fullres", "0")
    target = tmp_path / "fold_0"
    shutil.copytree(source, target)
    shutil.copy(target / "validation" / f"{CASES[0]}.nii.gz", target / "validation" / f"{CASES[5]}.nii.gz")
    shutil.copy(target / "validation" / f"{CASES[0]}.npz", target / "validation" / f"{CASES[5]}.npz")
    validate_fold(
        world["preprocessed"]["3d_fullres"],
        results / "plans.json",
        "3d_fullres",
        world["dataset"],
        results / "splits.json",
        0,
        target / "model_final.pt",
        target / "validation",
        settings={"device": "cpu", "mirroring": False, "threads": 1},
        save_probabilities=False,
        progress=False,
    )
    assert sorted(p.name for p in (target / "validation").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in SPLITS[0]["val"]] + ["summary.json"]
    )
    with pytest.raises(EvaluationError, match="previous_stage_dir"):
        validate_fold(
            world["preprocessed"]["3d_fullres"],
            results / "plans.json",
            "3d_cascade_fullres",
            world["dataset"],
            results / "splits.json",
            0,
            target / "model_final.pt",
            tmp_path / "v",
            settings={"device": "cpu", "mirroring": False},
            progress=False,
        )


# --------------------------------------------------------------------------------------------------------------
# crossval and ensembles


def test_crossval_pools_every_case_once_with_links(world):
    results = world["results"]
    folder = results / "crossval" / "3d_fullres"
    summary = read_json(folder / "summary.json")
    assert len(summary["metric_per_case"]) == 6
    assert sorted(Path(e["prediction_file"]).name for e in summary["metric_per_case"]) == [
        f"{c}.nii.gz" for c in CASES
    ]
    record = read_json(folder / "crossval.json")
    assert record["folds"] == ["0", "1"] and record["n_with_probabilities"] == 6
    assert record["case_fold"] == {c: ("0" if c in SPLITS[0]["val"] else "1") for c in CASES}
    for case in CASES:
        fold = record["case_fold"][case]
        for suffix in (".nii.gz", ".npz", ".json"):
            assert os.path.samefile(
                folder / f"{case}{suffix}",
                _fold_dir(results, "3d_fullres", fold) / "validation" / f"{case}{suffix}",
            )
    # the pooled score equals the per-case scores of the two folds put together
    fold_entries = [
        e
        for f in FOLDS
        for e in read_json(_fold_dir(results, "3d_fullres", f) / "validation" / "summary.json")[
            "metric_per_case"
        ]
    ]
    pooled = {Path(e["prediction_file"]).name: e["metrics"] for e in summary["metric_per_case"]}
    for entry in fold_entries:
        assert pooled[Path(entry["prediction_file"]).name] == entry["metrics"]
    assert world["crossvals"]["3d_fullres"]["n_cases"] == 6


def test_crossval_refuses_duplicate_and_missing_cases(world, tmp_path):
    results, dataset = world["results"], world["dataset"]
    fold0 = _fold_dir(results, "3d_fullres", "0") / "validation"
    fold1 = _fold_dir(results, "3d_fullres", "1") / "validation"
    with pytest.raises(EvaluationError, match=f"case {SPLITS[0]['val'][0]} was predicted in two folds"):
        crossval([fold0, fold0, fold1], dataset, tmp_path / "dup")
    with pytest.raises(EvaluationError, match="no cross-validation prediction"):
        crossval([fold0], dataset, tmp_path / "one_fold")
    partial = tmp_path / "fold_1" / "validation"
    shutil.copytree(fold1, partial)
    (partial / f"{CASES[4]}.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=f"{CASES[4]} of fold 1 are missing"):
        crossval([fold0, partial], dataset, tmp_path / "missing", splits_path=results / "splits.json")
    assert not (tmp_path / "missing" / "summary.json").exists()


def test_ensemble_is_the_argmax_of_averaged_probabilities(world):
    results, dataset = world["results"], world["dataset"]
    name = "ensemble_3d_fullres+3d_cascade_fullres"
    folder = results / "crossval" / name
    summary = read_json(folder / "summary.json")
    assert len(summary["metric_per_case"]) == 6
    for case in CASES:
        a = np.load(results / "crossval" / "3d_fullres" / f"{case}.npz")["probabilities"]
        b = np.load(results / "crossval" / "3d_cascade_fullres" / f"{case}.npz")["probabilities"]
        np.testing.assert_array_equal(_read(folder / f"{case}.nii.gz"), ((a + b) / 2).argmax(0))
        _assert_same_geometry(folder / f"{case}.nii.gz", dataset / "labelsTr" / f"{case}.nii.gz")
    with pytest.raises(EvaluationError, match="cover different cases"):
        ensemble_crossval(
            [results / "crossval" / "3d_fullres", _fold_dir(results, "3d_lowres", "0") / "validation"],
            dataset,
            world["root"] / "bad_ensemble",
        )


# --------------------------------------------------------------------------------------------------------------
# select and postprocessing


def test_selection_takes_the_best_candidate_in_nnunet_order(world):
    results = world["results"]
    selection = read_json(results / "selection.json")
    scores = {name: read_json(path)["foreground_mean"]["Dice"] for name, path in world["summaries"].items()}
    assert selection["all_results"] == pytest.approx(scores)
    order = [
        "3d_fullres",
        "3d_lowres",
        "3d_cascade_fullres",
        "ensemble_3d_fullres+3d_lowres",
        "ensemble_3d_fullres+3d_cascade_fullres",
        "ensemble_3d_lowres+3d_cascade_fullres",
    ]
    best = max(scores.values())
    assert selection["selected"] == next(n for n in order if scores[n] == best)  # min_win_share 0.5 = nnU-Net
    assert selection["inference_information"]["considered_models"] == order
    assert selection["folds"] == ["0", "1"]
    assert selection["crossval_folder"] == f"crossval/{selection['selected']}"
    assert selection["dataset_json"] == DATASET_JSON
    info = selection["inference_information"]["best_model_or_ensemble"]
    assert info["result_on_crossval_pre_pp"] == pytest.approx(best)
    assert [m["configuration"] for m in info["selected_model_or_models"]] == selection["members"]
    assert (results / "bootstrap.png").stat().st_size > 1000
    bootstrap = read_json(results / "bootstrap.json")
    assert bootstrap["n_bootstrap"] == 200 and set(bootstrap["candidates"]) == set(order)


def test_selection_is_deterministic_and_prefers_cheaper_with_high_threshold(world, tmp_path):
    results = world["results"]
    select(
        world["summaries"],
        tmp_path / "s.json",
        tmp_path / "b.json",
        tmp_path / "b.png",
        n_bootstrap=200,
        seed=3,
        dataset_dir=world["dataset"],
        plans_path=results / "plans.json",
    )
    assert (tmp_path / "b.json").read_bytes() == (results / "bootstrap.json").read_bytes()
    # a pair against one of its members, the pair being better pooled: nnU-Net's rule keeps the pair, a demand
    # that it wins in every resample falls back to the single configuration unless it really did win them all
    scores = {n: read_json(path)["foreground_mean"]["Dice"] for n, path in world["summaries"].items()}
    margins = {
        (n, m): scores[n] - scores[m]
        for n in scores
        if n.startswith("ensemble_")
        for m in n[len("ensemble_") :].split("+")
        if scores[n] > scores[m]
    }
    pair, single = min(margins, key=margins.get)  # the closest call
    two = {single: world["summaries"][single], pair: world["summaries"][pair]}
    default = select(
        two, tmp_path / "s1.json", tmp_path / "b1.json", tmp_path / "b1.png", n_bootstrap=200, seed=3
    )
    assert default["selected"] == default["nnunet_choice"] == pair
    strict = select(
        two,
        tmp_path / "s2.json",
        tmp_path / "b2.json",
        tmp_path / "b2.png",
        n_bootstrap=200,
        seed=3,
        min_win_share=1.0,
    )
    (comparison,) = read_json(tmp_path / "b2.json")["comparisons"]
    assert comparison["better"] == pair and comparison["cheaper"] == single
    assert strict["selected"] == (pair if comparison["win_share"] >= 1.0 else single)
    assert strict["nnunet_choice"] == pair
    assert read_json(tmp_path / "s2.json")["changed_by_bootstrap"] is (strict["selected"] != pair)


def test_postprocessing_decided_on_the_selected_crossval(world):
    from nnsnake.metrics import foreground_labels_or_regions
    from nnsnake.postprocessing import determine_postprocessing

    results, dataset = world["results"], world["dataset"]
    decision = read_json(results / "postprocessing.json")
    selected = read_json(results / "selection.json")["selected"]
    labels, _ = foreground_labels_or_regions(DATASET_JSON)
    direct = determine_postprocessing(
        results / "crossval" / selected,
        dataset / "labelsTr",
        labels,
        file_ending=".nii.gz",
        log=lambda _: None,
    )
    assert decision["steps"] == direct["steps"]
    assert decision["selected"] == selected
    assert decision["result_on_crossval_pre_pp"] == pytest.approx(
        direct["input_folder"]["foreground_mean"]["Dice"]
    )
    assert decision["result_on_crossval_post_pp"] == pytest.approx(
        direct["postprocessed"]["foreground_mean"]["Dice"]
    )
    assert len(decision["trials"]) == 3  # all foreground, then each of the two labels
    assert not any(p.name.startswith(".nnsnake_pp_") for p in results.iterdir())


# --------------------------------------------------------------------------------------------------------------
# predict


def test_predict_folder_writes_input_geometry_and_continues(world, tmp_path):
    results, dataset = world["results"], world["dataset"]
    out = tmp_path / "pred"
    info = predict_folder(
        dataset / "imagesTs",
        out,
        results,
        settings={"device": "cpu", "mirroring": False, "threads": 1},
        progress=False,
    )
    assert info["n_cases"] == 2 and info["n_predicted"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["new_0.nii.gz", "new_1.nii.gz", "prediction.json"]
    record = read_json(out / "prediction.json")
    assert record["selected"] == read_json(results / "selection.json")["selected"] and record["folds"] == [
        "0",
        "1",
    ]
    assert record["postprocessing_steps"] == read_json(results / "postprocessing.json")["steps"]
    for j in range(2):
        _assert_same_geometry(out / f"new_{j}.nii.gz", dataset / "imagesTs" / f"new_{j}_0000.nii.gz")
        assert set(np.unique(_read(out / f"new_{j}.nii.gz"))) <= {0, 1, 2}
    # --continue: nothing left to do, files untouched
    mtime = (out / "new_0.nii.gz").stat().st_mtime_ns
    again = predict_folder(
        dataset / "imagesTs",
        out,
        results,
        settings={"device": "cpu", "mirroring": False, "threads": 1},
        continue_prediction=True,
        progress=False,
    )
    assert again["n_predicted"] == 0 and (out / "new_0.nii.gz").stat().st_mtime_ns == mtime


def test_predict_folder_equals_fold_average_plus_postprocessing(world, tmp_path):
    from nnsnake.inference import InferenceSettings, predict_from_raw
    from nnsnake.postprocessing import apply_postprocessing

    dataset = world["dataset"]
    results = _results_with_selection(world, tmp_path, ["3d_fullres"])
    decision = {
        "steps": [
            {"operation": "keep_largest_component", "labels": [1, 2], "scope": "all_foreground"},
            {"operation": "keep_largest_component", "labels": [2], "scope": "2"},
        ]
    }
    write_json(results / "postprocessing.json", decision)
    out, manual = tmp_path / "pred", tmp_path / "manual"
    predict_folder(
        dataset / "imagesTs",
        out,
        results,
        settings={"device": "cpu", "mirroring": False, "threads": 1},
        progress=False,
    )
    predict_from_raw(
        {f"new_{j}": [dataset / "imagesTs" / f"new_{j}_0000.nii.gz"] for j in range(2)},
        manual,
        [_fold_dir(world["results"], "3d_fullres", f) / "model_final.pt" for f in FOLDS],
        PLANS,
        "3d_fullres",
        DATASET_JSON,
        settings=InferenceSettings(device="cpu", mirroring=False),
        progress=False,
    )
    changed = 0
    for j in range(2):
        raw = _read(manual / f"new_{j}.nii.gz")
        expected = apply_postprocessing(raw, decision)
        changed += int((expected != raw).sum())
        np.testing.assert_array_equal(_read(out / f"new_{j}.nii.gz"), expected)
    assert changed > 0  # the postprocessing did something here, so applying it is tested


def _results_with_selection(world, tmp_path: Path, members: list[str]) -> Path:
    results = tmp_path / "results" / f"{'+'.join(members)}"
    results.mkdir(parents=True)
    for name in ("plans.json", "postprocessing.json"):
        shutil.copy(world["results"] / name, results / name)
    (results / "training").symlink_to(world["results"] / "training")
    selection = copy.deepcopy(read_json(world["results"] / "selection.json"))
    selection.update(
        selected=members[0] if len(members) == 1 else "ensemble_" + "+".join(members), members=members
    )
    write_json(results / "selection.json", selection)
    return results


def test_predict_folder_ensemble_with_cascade_averages_member_probabilities(world, tmp_path):
    dataset = world["dataset"]
    outputs = {}
    for members in (["3d_fullres"], ["3d_cascade_fullres"], ["3d_fullres", "3d_cascade_fullres"]):
        results = _results_with_selection(world, tmp_path, members)
        out = tmp_path / "out" / "+".join(members)
        predict_folder(
            dataset / "imagesTs",
            out,
            results,
            settings={"device": "cpu", "mirroring": False, "threads": 1},
            save_probabilities=True,
            postprocess=False,
            progress=False,
        )
        outputs[tuple(members)] = out
        record = read_json(out / "prediction.json")
        if "3d_cascade_fullres" in members:  # the previous stage runs first, and only once
            assert record["configurations_run"] == [m for m in members if m != "3d_cascade_fullres"] + [
                "3d_lowres",
                "3d_cascade_fullres",
            ]
        assert not (out / ".nnsnake_work").exists()
    for j in range(2):
        single = [
            np.load(outputs[(m,)] / f"new_{j}.npz")["probabilities"]
            for m in ("3d_fullres", "3d_cascade_fullres")
        ]
        ensemble = np.load(outputs["3d_fullres", "3d_cascade_fullres"] / f"new_{j}.npz")["probabilities"]
        np.testing.assert_allclose(ensemble, (single[0] + single[1]) / 2, atol=1e-6)
        seg = _read(outputs["3d_fullres", "3d_cascade_fullres"] / f"new_{j}.nii.gz")
        np.testing.assert_array_equal(seg, ensemble.argmax(0))
        for out in outputs.values():
            _assert_same_geometry(out / f"new_{j}.nii.gz", dataset / "imagesTs" / f"new_{j}_0000.nii.gz")
            assert read_json(out / f"new_{j}.json")["spacing"]


# --------------------------------------------------------------------------------------------------------------
# input verification


def test_bad_input_folder_is_reported_file_by_file_before_predicting(world, tmp_path):
    dataset, results = world["dataset"], world["results"]
    bad = tmp_path / "in"
    bad.mkdir()
    shutil.copy(dataset / "imagesTs" / "new_0_0000.nii.gz", bad / "good_0000.nii.gz")
    shutil.copy(dataset / "imagesTs" / "new_0_0000.nii.gz", bad / "good_0001.nii.gz")  # undeclared channel
    shutil.copy(dataset / "imagesTs" / "new_0_0000.nii.gz", bad / "noindex.nii.gz")  # no _XXXX
    shutil.copy(dataset / "imagesTs" / "new_0_0000.nii.gz", bad / "other_0000.nrrd")  # other file ending
    (bad / "corrupt_0000.nii.gz").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    with pytest.raises(PredictionInputError) as error:
        predict_folder(bad, out, results, settings={"device": "cpu", "mirroring": False}, progress=False)
    message = str(error.value)
    for name in ("good_0001.nii.gz", "noindex.nii.gz", "other_0000.nrrd", "corrupt_0000.nii.gz"):
        assert name in message
    assert "has 4 problem(s); nothing was predicted" in message.splitlines()[0]
    assert not out.exists()
    with pytest.raises(PredictionInputError, match="does not exist"):
        predict_folder(tmp_path / "absent", out, results, settings={"device": "cpu"}, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PredictionInputError, match="no images"):
        predict_folder(empty, out, results, settings={"device": "cpu"}, progress=False)


def test_channels_must_be_complete_and_share_geometry(tmp_path):
    two_channels = {**DATASET_JSON, "channel_names": {"0": "T1", "1": "T2"}}
    rng = np.random.default_rng(1)
    image = rng.random((6, 7, 8)).astype(np.float32)
    geometry = ((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), _direction(0.1, 0.2))
    _write(image, tmp_path / "in" / "a_0000.nii.gz", *geometry)
    _write(image, tmp_path / "in" / "a_0001.nii.gz", *geometry)
    _write(image, tmp_path / "in" / "b_0000.nii.gz", *geometry)
    _write(image, tmp_path / "in" / "b_0001.nii.gz", (1.0, 1.0, 3.0), *geometry[1:])
    _write(image, tmp_path / "in" / "c_0000.nii.gz", *geometry)
    _write(image, tmp_path / "in" / "d_0000.nii.gz", *geometry)
    _write(image, tmp_path / "in" / "d_0001.nii.gz", geometry[0], (5.0, 0.0, 0.0), geometry[2])
    with pytest.raises(PredictionInputError) as error:
        verify_prediction_inputs(tmp_path / "in", two_channels)
    lines = str(error.value).splitlines()
    assert "3 problem(s)" in lines[0]
    assert any("b_0001.nii.gz" in line and "spacing" in line for line in lines)
    assert any("c_0001.nii.gz" in line and "missing channel" in line for line in lines)
    assert any("d_0001.nii.gz" in line and "origin" in line for line in lines)
    for name in ("b", "c", "d"):
        for path in (tmp_path / "in").glob(f"{name}_*"):
            path.unlink()
    assert verify_prediction_inputs(tmp_path / "in", two_channels) == {
        "a": [(tmp_path / "in" / "a_0000.nii.gz").resolve(), (tmp_path / "in" / "a_0001.nii.gz").resolve()]
    }


def test_missing_models_and_results_are_named(world, tmp_path):
    dataset, results = world["dataset"], world["results"]
    with pytest.raises(EvaluationError, match="fold_7/model_final.pt"):
        predict_folder(
            dataset / "imagesTs",
            tmp_path / "o",
            results,
            folds=[0, 7],
            settings={"device": "cpu"},
            progress=False,
        )
    assert not (tmp_path / "o").exists()
    with pytest.raises(EvaluationError, match="did you mean .*Dataset990_Tiny"):
        predict_folder(
            dataset / "imagesTs", tmp_path / "o", results.parent, settings={"device": "cpu"}, progress=False
        )
    with pytest.raises(EvaluationError, match="must differ"):
        predict_folder(
            dataset / "imagesTs", dataset / "imagesTs", results, settings={"device": "cpu"}, progress=False
        )


def test_module_has_no_snakemake_import():
    assert "snakemake" not in Path(evaluation.__file__).read_text()
