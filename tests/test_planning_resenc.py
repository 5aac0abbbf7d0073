"""The residual-encoder planner presets against nnunetv2 2.8.1 (nnunet_v2_extensions.md §1, docs/method.md §16).

Reference plans come from ``tests/fixtures/nnunetv2/`` (``make_resenc_plans.py``, run with the anchor venv):
``<Dataset>/nnUNetResEncUNet{M,L,XL}Plans.json`` for every shared dataset, and ``synthetic_resenc_plans.json``
for synthetic fingerprints (3d_lowres, transposes, 2D images, ignore labels, GPU-target overrides).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nnsnake.jsonio import dumps
from nnsnake.planning import (
    PLANNER_PRESETS,
    estimate_vram_proxy_residual,
    estimated_vram_gb,
    get_planner_preset,
    plan_experiment,
    planner_for_plans,
    resolve_configuration,
)

NNUNET_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nnunetv2"
DATASETS = sorted(
    p.name for p in NNUNET_FIXTURES.glob("Dataset*") if (p / "nnUNetResEncUNetMPlans.json").exists()
)
PRESETS = {"M": "nnUNetPlannerResEncM", "L": "nnUNetPlannerResEncL", "XL": "nnUNetPlannerResEncXL"}
SYNTHETIC_INPUTS = {
    s["tag"]: s for s in json.loads((NNUNET_FIXTURES / "synthetic_plans.json").read_text())["scenarios"]
}
SYNTHETIC = json.loads((NNUNET_FIXTURES / "synthetic_resenc_plans.json").read_text())["scenarios"]
RESENC_KEYS = ("network_class_name", "n_blocks_per_stage", "n_conv_per_stage_decoder", "conv_bias")


def _inputs(dataset_name):
    folder = NNUNET_FIXTURES / dataset_name
    fingerprint = json.loads((folder / "dataset_fingerprint.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    return fingerprint, dataset_json


def test_fixtures_cover_every_dataset_and_preset():
    assert len(DATASETS) == 6
    for name in DATASETS:
        for preset in PRESETS:
            assert (NNUNET_FIXTURES / name / f"nnUNetResEncUNet{preset}Plans.json").exists()


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dataset_name", DATASETS)
def test_resenc_plans_equal_nnunetv2_on_reference_datasets(dataset_name, preset):
    reference = json.loads(
        (NNUNET_FIXTURES / dataset_name / f"nnUNetResEncUNet{preset}Plans.json").read_text()
    )
    fingerprint, dataset_json = _inputs(dataset_name)
    ours = plan_experiment(
        fingerprint,
        dataset_json,
        dataset_name,
        image_reader_writer=reference["image_reader_writer"],
        planner=PRESETS[preset],
    )
    assert ours["plans_name"] == reference["plans_name"] == f"nnUNetResEncUNet{preset}Plans"
    assert ours["experiment_planner_used"] == PRESETS[preset]
    assert list(ours["configurations"]) == list(reference["configurations"])
    for name, ref_config in reference["configurations"].items():
        config = ours["configurations"][name]
        for key in ("data_identifier", "patch_size", "batch_size", "batch_dice", "spacing"):
            assert config.get(key) == ref_config.get(key), f"{name}.{key}"
        if "architecture" in ref_config:
            arch, ref_arch = config["architecture"], ref_config["architecture"]
            assert arch["network_class_name"] == ref_arch["network_class_name"]
            for key in RESENC_KEYS[1:] + ("kernel_sizes", "strides", "features_per_stage", "n_stages"):
                assert arch["arch_kwargs"][key] == ref_arch["arch_kwargs"][key], f"{name}.{key}"
    assert dumps(ours) == dumps(reference)  # every field, byte for byte


@pytest.mark.parametrize(
    "scenario", SYNTHETIC, ids=[f"{s['tag']}-{s['planner']}-{s['gpu_memory_target_gb']}" for s in SYNTHETIC]
)
def test_resenc_plans_equal_nnunetv2_on_synthetic_fingerprints(scenario):
    inputs = SYNTHETIC_INPUTS[scenario["tag"]]
    ours = plan_experiment(
        inputs["fingerprint"],
        inputs["dataset_json"],
        scenario["dataset_name"],
        scenario["gpu_memory_target_gb"],
        scenario["overwrite_target_spacing"],
        planner=scenario["planner"],
    )
    assert dumps(ours) == dumps(scenario["plans"])


def test_synthetic_fixture_covers_lowres_overrides_and_the_base_planner():
    """Guard against a regenerated fixture silently losing coverage."""
    lowres = [s for s in SYNTHETIC if "3d_lowres" in s["plans"]["configurations"]]
    assert {s["planner"] for s in lowres} >= {
        "nnUNetPlannerResEncM",
        "nnUNetPlannerResEncL",
        "ResEncUNetPlanner",
    }
    identifiers = {s["plans"]["configurations"]["3d_lowres"]["data_identifier"] for s in lowres}
    assert "nnUNetResEncUNetMPlans_3d_lowres" in identifiers
    assert any(s["gpu_memory_target_gb"] not in (None, 8.0) for s in SYNTHETIC)
    assert any("3d_fullres" not in s["plans"]["configurations"] for s in SYNTHETIC)


def test_hippocampus_golden_values_from_the_spec():
    """nnunet_v2_extensions.md §1.5, independent of the fixture generator."""
    fingerprint, dataset_json = _inputs("Dataset004_Hippocampus")
    batches = {}
    for preset, planner in PRESETS.items():
        plans = plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus", planner=planner)
        full, two_d = plans["configurations"]["3d_fullres"], plans["configurations"]["2d"]
        assert full["patch_size"] == [40, 56, 40] and two_d["patch_size"] == [56, 40]
        assert full["architecture"]["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6]
        assert full["architecture"]["arch_kwargs"]["n_conv_per_stage_decoder"] == [1, 1, 1]
        assert "n_conv_per_stage" not in full["architecture"]["arch_kwargs"]
        assert (
            full["data_identifier"] == "nnUNetPlans_3d_fullres"
            and two_d["data_identifier"] == "nnUNetPlans_2d"
        )
        batches[preset] = (full["batch_size"], two_d["batch_size"])
    assert batches == {"M": (58, 1618), "L": (178, 4554), "XL": (183, 6711)}
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    features = [32, 64, 128, 256]
    assert (
        estimate_vram_proxy_residual([40, 56, 40], strides, features, 3, [1, 3, 4, 6], [1, 1, 1])
        == 23_609_600
    )
    assert estimate_vram_proxy_residual(
        [56, 40], [s[1:] for s in strides], features, 3, [1, 3, 4, 6], [1, 1, 1]
    ) == (1_001_280)


def test_isbi_golden_values_from_the_spec():
    fingerprint, dataset_json = _inputs("Dataset201_ISBI2012EM")
    got = {
        preset: plan_experiment(fingerprint, dataset_json, "Dataset201_ISBI2012EM", planner=planner)[
            "configurations"
        ]["2d"]
        for preset, planner in PRESETS.items()
    }
    assert {k: v["batch_size"] for k, v in got.items()} == {"M": 13, "L": 30, "XL": 30}
    assert got["M"]["architecture"]["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6, 6, 6]


def test_presets_are_data_and_the_default_is_unchanged():
    assert set(PLANNER_PRESETS) == {
        "ExperimentPlanner",
        "ResEncUNetPlanner",
        "nnUNetPlannerResEncM",
        "nnUNetPlannerResEncL",
        "nnUNetPlannerResEncXL",
    }
    m, big, xl = (get_planner_preset(PRESETS[k]) for k in ("M", "L", "XL"))
    assert (m.gpu_memory_target_gb, big.gpu_memory_target_gb, xl.gpu_memory_target_gb) == (8, 24, 40)
    assert (m.reference_vram_proxy_3d, big.reference_vram_proxy_3d, xl.reference_vram_proxy_3d) == (
        680_000_000,
        2_100_000_000,
        3_600_000_000,
    )
    assert (
        m.max_dataset_fraction_per_batch == 1 and get_planner_preset().max_dataset_fraction_per_batch == 0.05
    )
    fingerprint, dataset_json = _inputs("Dataset004_Hippocampus")
    default = plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus")
    assert dumps(default) == dumps(
        plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus", planner="ExperimentPlanner")
    )
    with pytest.raises(ValueError, match="nnUNetPlannerResEncM"):
        plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus", planner="nnUNetPlannerResEncS")


def test_gpu_memory_target_overrides_the_preset_and_is_reported():
    fingerprint, dataset_json = _inputs("Dataset004_Hippocampus")
    base = plan_experiment(fingerprint, dataset_json, "D", planner="nnUNetPlannerResEncL")
    explicit = plan_experiment(fingerprint, dataset_json, "D", 24.0, planner="nnUNetPlannerResEncL")
    assert dumps(base) == dumps(explicit)  # the preset's own target is the default
    half = plan_experiment(fingerprint, dataset_json, "D", 12.0, planner="nnUNetPlannerResEncL")
    assert half["configurations"]["3d_fullres"]["batch_size"] == round(177.9 / 2)
    for plans, target, planner in ((base, 24, "nnUNetPlannerResEncL"), (half, 12, "nnUNetPlannerResEncL")):
        assert planner_for_plans(plans).planner == planner
        for name in plans["configurations"]:
            configuration = resolve_configuration(plans, name)
            gb = estimated_vram_gb(configuration, 3, planner)
            uncapped = configuration["batch_size"] < 183  # 183 = the dataset cap of 3d_fullres
            assert gb <= target * 1.01 and (gb > 0.95 * target or not uncapped), (name, gb)
    # without a planner the network class decides (the M preset for a ResidualEncoderUNet)
    m = plan_experiment(fingerprint, dataset_json, "D", planner="nnUNetPlannerResEncM")
    assert math.isclose(estimated_vram_gb(m["configurations"]["3d_fullres"], 3), 8 * 58 / 57.6, rel_tol=2e-3)
