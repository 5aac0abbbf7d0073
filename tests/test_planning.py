"""Experiment planning against nnU-Net v2: the golden plans of the method spec (§12.1) from fingerprint-level
inputs, nnunetv2's own plans of every reference dataset, and nnunetv2's planner on synthetic fingerprints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnsnake import planning
from nnsnake.jsonio import dumps
from nnsnake.planning import (
    determine_fullres_target_spacing,
    determine_normalization,
    determine_transpose,
    estimate_vram_proxy,
    estimated_vram_gb,
    get_plans_for_configuration,
    get_pool_and_conv_props,
    merge_custom_configurations,
    plan_experiment,
    resolve_configuration,
)

NNUNET_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nnunetv2"
ANCHOR_DATASETS = sorted(p.parent.name for p in NNUNET_FIXTURES.glob("Dataset*/nnUNetPlans.json"))
SYNTHETIC = json.loads((NNUNET_FIXTURES / "synthetic_plans.json").read_text())


def synthetic_inputs(n_cases, spacing, shape, channel_names=("CT",), n_label_keys=2, relative_size=1.0):
    """A fingerprint of ``n_cases`` identical cases: median spacing/shape equal the stated values."""
    fingerprint = {
        "spacings": [list(spacing)] * n_cases,
        "shapes_after_crop": [list(shape)] * n_cases,
        "foreground_intensity_properties_per_channel": {
            str(c): {
                "max": 1.0,
                "mean": 0.5,
                "median": 0.5,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 0.1,
            }
            for c in range(len(channel_names))
        },
        "median_relative_size_after_cropping": relative_size,
    }
    labels = {"background": 0, **{f"label{i}": i for i in range(1, n_label_keys)}}
    dataset_json = {
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    return fingerprint, dataset_json


def proxy_of(configuration, n_label_keys):
    arch = configuration["architecture"]["arch_kwargs"]
    return estimate_vram_proxy(
        configuration["patch_size"], arch["strides"], arch["features_per_stage"], n_label_keys
    )


# ---- golden plans of docs/method.md §12.1 ----------------------------------------------------------------------------
def test_hippocampus_golden_plan():
    fingerprint, dataset_json = synthetic_inputs(260, [1.0, 1.0, 1.0], [36, 50, 35], ("MRI",), 3)
    plans = plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus")
    assert set(plans["configurations"]) == {
        "2d",
        "3d_fullres",
    }  # the patch covers the median image: no lowres

    fullres = plans["configurations"]["3d_fullres"]
    assert fullres["spacing"] == [1.0, 1.0, 1.0]
    assert fullres["patch_size"] == [40, 56, 40]
    assert fullres["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 3
    assert fullres["architecture"]["arch_kwargs"]["features_per_stage"] == [32, 64, 128, 256]
    assert fullres["batch_size"] == 9
    assert fullres["batch_dice"] is False
    proxy = proxy_of(fullres, 3)
    assert proxy == 19_174_400
    assert round(560e6 / proxy * 2) == 58  # uncapped batch size
    assert round(36 * 50 * 35 * 260 * 0.05 / (40 * 56 * 40)) == 9  # the 5 % cap decides

    plan_2d = plans["configurations"]["2d"]
    assert plan_2d["patch_size"] == [56, 40]
    assert plan_2d["architecture"]["arch_kwargs"]["strides"] == [[1, 1]] + [[2, 2]] * 3
    assert plan_2d["batch_size"] == 366
    assert round(85e6 / proxy_of(plan_2d, 3) * 12) == 1565
    assert plan_2d["batch_dice"] is True
    assert plans["transpose_forward"] == [0, 1, 2] and plans["transpose_backward"] == [0, 1, 2]


def test_msd_lung_golden_plan_with_22_step_lowres_search():
    z_spacing = float(np.float32(1.24498))  # MSD Lung median spacing as read from float32 NIfTI headers
    fingerprint, dataset_json = synthetic_inputs(63, [z_spacing, 0.78515625, 0.78515625], [252, 512, 512])
    plans = plan_experiment(fingerprint, dataset_json, "Dataset006_Lung")
    configurations = plans["configurations"]
    assert list(configurations) == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]

    fullres = configurations["3d_fullres"]
    assert fullres["patch_size"] == [80, 192, 160]
    assert fullres["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4 + [[1, 2, 2]]
    assert fullres["batch_size"] == 2
    assert proxy_of(fullres, 2) == pytest.approx(528.2e6, abs=0.05e6)
    assert fullres["batch_dice"] is True

    lowres = configurations["3d_lowres"]
    assert [round(s, 8) for s in lowres["spacing"]] == [2.38551038, 1.50444057, 1.50444057]
    expected_spacing = np.array(fullres["spacing"])
    for _ in range(22):
        expected_spacing *= 1.03
    assert lowres["spacing"] == expected_spacing.tolist()  # exactly 22 steps of x1.03, bit for bit
    assert lowres["median_image_size_in_voxels"] == [132, 267, 267]
    assert lowres["patch_size"] == [80, 192, 160]
    assert (
        lowres["architecture"]["arch_kwargs"]["strides"] == fullres["architecture"]["arch_kwargs"]["strides"]
    )
    assert lowres["batch_size"] == 2
    assert lowres["batch_dice"] is False
    lowres_voxels = math.prod(
        fullres["spacing"][i] / lowres["spacing"][i] * fullres["median_image_size_in_voxels"][i]
        for i in range(3)
    )
    assert math.prod(fullres["median_image_size_in_voxels"]) / lowres_voxels == pytest.approx(7.03, abs=0.005)

    assert lowres["next_stage"] == "3d_cascade_fullres"
    assert configurations["3d_cascade_fullres"] == {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }

    plan_2d = configurations["2d"]
    assert plan_2d["spacing"] == [0.78515625, 0.78515625]
    assert plan_2d["patch_size"] == [512, 512]
    assert plan_2d["architecture"]["arch_kwargs"]["strides"] == [[1, 1]] + [[2, 2]] * 7
    assert plan_2d["batch_size"] == 12


@pytest.mark.parametrize(
    ("spacing", "median", "patch", "last_stride"),
    [
        ([1.5, 1.5, 1.5], [403.0, 249.0, 259.0], [192, 112, 112], [2, 1, 1]),  # issue #1879
        ([1.0, 1.0, 1.0], [139.0, 171.0, 137.0], [128, 128, 128], [2, 2, 2]),  # issue #1870 (BraTS)
        ([0.6, 0.347, 0.347], [512.0, 512.0, 706.0], [128, 112, 160], [2, 1, 2]),  # issue #1898
        ([3.69, 1.88, 1.88], [103, 296, 296], [64, 192, 192], [1, 2, 2]),  # issue #2036 (3d_lowres)
    ],
)
def test_issue_plans(spacing, median, patch, last_stride):
    n_voxels = float(np.prod(median, dtype=np.float64) * 100)
    plan = get_plans_for_configuration(
        spacing, median, "nnUNetPlans_3d_fullres", n_voxels, 2, ["CTNormalization"], [False]
    )
    assert plan["patch_size"] == patch
    assert plan["architecture"]["arch_kwargs"]["strides"][-1] == last_stride
    assert plan["batch_size"] == 2


def test_kernel_example_issue_2412():
    _, strides, kernels, _, _ = get_pool_and_conv_props([2.0, 0.78, 0.78], [64, 192, 192])
    assert kernels[0] == [1, 3, 3]
    assert strides[1] == [1, 2, 2]


# ---- nnunetv2's own output ---------------------------------------------------------------------------------
def assert_plans_equal_nnunetv2(ours: dict, reference: dict) -> None:
    """Plans equal nnunetv2's: field by field first (readable failures), then byte for byte."""
    assert list(ours["configurations"]) == list(reference["configurations"])
    for key in (
        "transpose_forward",
        "transpose_backward",
        "original_median_spacing_after_transp",
        "original_median_shape_after_transp",
    ):
        assert ours[key] == reference[key], key
    for name, ref_config in reference["configurations"].items():
        config = ours["configurations"][name]
        for key in (
            "spacing",
            "median_image_size_in_voxels",
            "patch_size",
            "batch_size",
            "batch_dice",
            "normalization_schemes",
            "use_mask_for_norm",
            "resampling_fn_data",
            "resampling_fn_seg",
            "resampling_fn_probabilities",
            "resampling_fn_data_kwargs",
            "resampling_fn_seg_kwargs",
            "resampling_fn_probabilities_kwargs",
            "next_stage",
            "previous_stage",
            "inherits_from",
        ):
            assert config.get(key) == ref_config.get(key), f"{name}.{key}"
        if "architecture" in ref_config:
            arch, ref_arch = config["architecture"]["arch_kwargs"], ref_config["architecture"]["arch_kwargs"]
            for key in ("kernel_sizes", "strides", "features_per_stage", "n_stages"):
                assert arch[key] == ref_arch[key], f"{name}.architecture.{key}"
    assert dumps(ours) == dumps(reference)  # and the files are identical, byte for byte


@pytest.mark.parametrize("dataset_name", ANCHOR_DATASETS)
def test_plans_equal_nnunetv2_on_reference_datasets(dataset_name):
    folder = NNUNET_FIXTURES / dataset_name
    reference = json.loads((folder / "nnUNetPlans.json").read_text())
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    ours = plan_experiment(
        fingerprint, dataset_json, dataset_name, image_reader_writer=reference["image_reader_writer"]
    )

    assert_plans_equal_nnunetv2(ours, reference)


@pytest.mark.parametrize("scenario", SYNTHETIC["scenarios"], ids=[s["tag"] for s in SYNTHETIC["scenarios"]])
def test_plans_equal_nnunetv2_on_synthetic_fingerprints(scenario):
    ours = plan_experiment(
        scenario["fingerprint"],
        scenario["dataset_json"],
        scenario["dataset_name"],
        scenario["gpu_memory_target_gb"],
        scenario["overwrite_target_spacing"],
    )
    assert dumps(ours) == dumps(scenario["plans"])


@pytest.mark.parametrize(
    "case", SYNTHETIC["single_configurations"], ids=[c["tag"] for c in SYNTHETIC["single_configurations"]]
)
def test_single_configuration_equals_nnunetv2(case):
    reference = case["plan"]
    ours = get_plans_for_configuration(
        case["spacing"],
        case["median_shape"],
        case["tag"],
        case["n_voxels_dataset"],
        case["num_label_keys"],
        reference["normalization_schemes"],
        reference["use_mask_for_norm"],
    )
    assert dumps(ours) == dumps(reference)


def test_synthetic_fixture_covers_the_interesting_branches():
    """Guard against a regenerated fixture silently losing coverage."""
    by_tag = {s["tag"]: s["plans"] for s in SYNTHETIC["scenarios"]}
    assert by_tag["TransposeLast"]["transpose_forward"] == [2, 0, 1]
    assert by_tag["TransposeMiddle"]["transpose_forward"] == [1, 0, 2]
    assert "3d_fullres" not in by_tag["NaturalImages2D"]["configurations"]
    assert "3d_lowres" in by_tag["AnisoLarge"]["configurations"]
    assert "3d_lowres" not in by_tag["LowresDropped"]["configurations"]
    assert any(v for v in by_tag["MultiChannelMask"]["configurations"]["2d"]["use_mask_for_norm"])
    patches = [
        p
        for plans in by_tag.values()
        for c in plans["configurations"].values()
        for p in c.get("patch_size", [])
    ]
    assert 224 in patches  # the two-step shrink that does not skip 224
    ulp = by_tag["PercentileNotMedian"]  # target spacing from np.percentile, reference spacing from np.median
    assert ulp["configurations"]["3d_fullres"]["spacing"][0] != ulp["original_median_spacing_after_transp"][0]


# ---- pieces ------------------------------------------------------------------------------------------------
def test_topology_pads_patch_to_multiple_and_keeps_224():
    num_pool, strides, kernels, patch, divisible_by = get_pool_and_conv_props([1, 1, 1], [224, 224, 224])
    assert num_pool == [5, 5, 5] and divisible_by == [32, 32, 32] and patch == [224, 224, 224]
    assert len(kernels) == len(strides) == 6 and kernels[-1] == [3, 3, 3]
    assert get_pool_and_conv_props([1, 1, 1], [36, 50, 35])[3] == [40, 56, 40]
    # a single valid axis smaller than 3 * min_feature_map_size is not pooled again
    assert get_pool_and_conv_props([1.0], [11])[1] == [[1]]


def test_vram_proxy_counts_conv_outputs_by_hand():
    # 2 stages, 2D 8x8 patch: encoder 2*32*64 + 2*64*16, decoder (2+1)*32*64, head 3*64
    assert estimate_vram_proxy([8, 8], [[1, 1], [2, 2]], [32, 64], 3) == 4096 + 2048 + 6144 + 192


def test_target_spacing_anisotropy_needs_both_conditions():
    spacings = [[5.0, 0.8, 0.8]] * 9 + [[1.0, 0.8, 0.8]]
    thin = [[20, 400, 400]] * 10
    assert determine_fullres_target_spacing(spacings, thin).tolist() == [
        np.percentile([5.0] * 9 + [1.0], 10),
        0.8,
        0.8,
    ]
    thick = [[300, 400, 400]] * 10  # anisotropic spacing but not few slices: the median stays
    assert determine_fullres_target_spacing(spacings, thick).tolist() == [5.0, 0.8, 0.8]
    finer = [[5.0, 0.8, 0.8]] * 8 + [[0.5, 0.8, 0.8]] * 2  # 10th percentile finer than in-plane: clamp
    assert determine_fullres_target_spacing(finer, thin)[0] == 0.8 + 1e-5
    assert determine_fullres_target_spacing(spacings, thin, [2.0, 1.0, 1.0]).tolist() == [2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="overwrite_target_spacing"):
        determine_fullres_target_spacing(spacings, thin, [2.0, 1.0])


def test_transpose_puts_coarsest_axis_first():
    assert determine_transpose([0.7, 0.7, 3.0]) == ([2, 0, 1], [1, 2, 0])
    assert determine_transpose([0.7, 3.0, 0.7]) == ([1, 0, 2], [1, 0, 2])
    assert determine_transpose([1.0, 1.0, 1.0]) == ([0, 1, 2], [0, 1, 2])


def test_normalization_choice():
    dataset_json = {
        "channel_names": {
            "0": "ct",
            "1": "T2",
            "2": "noNorm",
            "3": "ZSCORE",
            "4": "rescale_to_0_1",
            "5": "rgb_to_0_1",
        }
    }
    schemes, mask = determine_normalization(dataset_json, 0.5)
    assert schemes == [
        "CTNormalization",
        "ZScoreNormalization",
        "NoNormalization",
        "ZScoreNormalization",
        "RescaleTo01Normalization",
        "RGBTo01Normalization",
    ]
    assert mask == [False, True, False, True, False, False]
    assert determine_normalization(dataset_json, 0.75)[1] == [False] * 6


def test_gpu_memory_target_changes_the_plan_and_is_reported():
    fingerprint, dataset_json = synthetic_inputs(50, [1.0, 1.0, 1.0], [300, 300, 300])
    small = plan_experiment(fingerprint, dataset_json, "Dataset999_X", gpu_memory_target_gb=4.0)
    large = plan_experiment(fingerprint, dataset_json, "Dataset999_X", gpu_memory_target_gb=24.0)
    small_patch = math.prod(small["configurations"]["3d_fullres"]["patch_size"])
    assert small_patch < math.prod(large["configurations"]["3d_fullres"]["patch_size"])
    for plans, target in ((small, 4.0), (large, 24.0)):
        for name in plans["configurations"]:
            gb = estimated_vram_gb(resolve_configuration(plans, name), 2)
            assert 0.5 * target < gb <= target * 1.1, (name, gb)
    with pytest.raises(ValueError, match="gpu_memory_target_gb"):
        plan_experiment(fingerprint, dataset_json, "Dataset999_X", gpu_memory_target_gb=1e-7)


def test_resolve_configuration_inheritance():
    fingerprint, dataset_json = synthetic_inputs(63, [1.245, 0.785, 0.785], [252, 512, 512])
    plans = plan_experiment(fingerprint, dataset_json, "Dataset006_Lung")
    cascade = resolve_configuration(plans, "3d_cascade_fullres")
    assert cascade["previous_stage"] == "3d_lowres"
    assert cascade["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]
    assert cascade["data_identifier"] == "nnUNetPlans_3d_fullres"

    plans["configurations"]["3d_fullres_bs40"] = {"inherits_from": "3d_cascade_fullres", "batch_size": 40}
    custom = resolve_configuration(plans, "3d_fullres_bs40")
    assert custom["batch_size"] == 40 and custom["previous_stage"] == "3d_lowres"
    assert plans["configurations"]["3d_fullres"]["batch_size"] == 2  # the parent is not modified

    plans["configurations"]["a"] = {"inherits_from": "b"}
    plans["configurations"]["b"] = {"inherits_from": "a"}
    with pytest.raises(ValueError, match="circular"):
        resolve_configuration(plans, "a")
    plans["configurations"]["orphan"] = {"inherits_from": "missing"}
    with pytest.raises(KeyError, match="missing"):
        resolve_configuration(plans, "orphan")
    with pytest.raises(KeyError, match="available"):
        resolve_configuration(plans, "3d_nope")


def test_custom_configurations_survive_replanning():
    fingerprint, dataset_json = synthetic_inputs(20, [1.0, 1.0, 1.0], [36, 50, 35])
    new = plan_experiment(fingerprint, dataset_json, "Dataset999_X")
    old = {
        "configurations": {
            "3d_fullres": {"batch_size": 99},
            "3d_fullres_bs40": {"inherits_from": "3d_fullres"},
        }
    }
    merged = merge_custom_configurations(new, old)
    assert merged["configurations"]["3d_fullres"] == new["configurations"]["3d_fullres"]
    assert merged["configurations"]["3d_fullres_bs40"] == {"inherits_from": "3d_fullres"}


def test_plan_is_deterministic_and_json_clean():
    fingerprint, dataset_json = synthetic_inputs(63, [1.245, 0.785, 0.785], [252, 512, 512])
    first = plan_experiment(fingerprint, dataset_json, "Dataset006_Lung")
    assert dumps(first) == dumps(plan_experiment(fingerprint, dataset_json, "Dataset006_Lung"))
    assert json.loads(json.dumps(first)) == first  # plain Python types only (no numpy scalars)


def test_missing_inputs_give_clear_errors():
    fingerprint, dataset_json = synthetic_inputs(5, [1.0, 1.0, 1.0], [30, 30, 30])
    del fingerprint["spacings"]
    with pytest.raises(KeyError, match="spacings"):
        plan_experiment(fingerprint, dataset_json, "Dataset999_X")
    fingerprint, dataset_json = synthetic_inputs(5, [1.0, 1.0, 1.0], [30, 30, 30])
    del dataset_json["channel_names"]
    with pytest.raises(ValueError, match="channel_names"):
        plan_experiment(fingerprint, dataset_json, "Dataset999_X")


def test_constants_match_spec():
    assert planning.REFERENCE_VRAM_PROXY_3D == 560_000_000 and planning.REFERENCE_VRAM_PROXY_2D == 85_000_000
    assert planning.LOWRES_SPACING_STEP == 1.03 and planning.MAX_DATASET_FRACTION_PER_BATCH == 0.05
    assert planning.MAX_FEATURES_3D == 320 and planning.MAX_FEATURES_2D == 512
