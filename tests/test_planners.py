"""Several planners and derived configurations, library side (issue 13): inherits_from entries, which preprocessed
folder a configuration reads, and the selection's parameter cost across planners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnsnake.errors import ConfigError
from nnsnake.planning import (
    add_extra_configurations,
    plan_experiment,
    preprocessed_data_owner,
    resolve_configuration,
    same_preprocessing,
)
from nnsnake.steps.select import _candidate_sort_key, _parameter_counts

FIXTURES = Path(__file__).parent / "fixtures" / "nnunetv2" / "Dataset004_Hippocampus"


def _plans(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(scope="module")
def classic() -> dict:
    return _plans("nnUNetPlans.json")


@pytest.fixture(scope="module")
def resenc_m() -> dict:
    return _plans("nnUNetResEncUNetMPlans.json")


def test_extra_configuration_resolves_as_nnunet(classic: dict) -> None:
    extra = {
        "3d_fullres_bs24": {"inherits_from": "3d_fullres", "batch_size": 24},
        "3d_fullres_bs24_ps": {"inherits_from": "3d_fullres_bs24", "patch_size": [32, 32, 32]},
    }
    plans = add_extra_configurations(classic, extra)
    assert "3d_fullres_bs24" not in classic["configurations"]  # the input is left alone
    resolved = resolve_configuration(plans, "3d_fullres_bs24_ps")
    parent = classic["configurations"]["3d_fullres"]
    assert resolved["batch_size"] == 24 and resolved["patch_size"] == [32, 32, 32]
    assert resolved["architecture"] == parent["architecture"]  # shallow merge: the parent's dict as it is
    assert resolved["inherits_from"] == "3d_fullres_bs24"  # nnU-Net keeps the child's key
    # derived configurations read their parent's data; the cascade reads 3d_fullres's
    assert preprocessed_data_owner(plans, "3d_fullres_bs24_ps") == "3d_fullres"
    assert preprocessed_data_owner(plans, "2d") == "2d"
    own = add_extra_configurations(
        classic, {"x": {"inherits_from": "2d", "data_identifier": "nnUNetPlans_x"}}
    )
    assert preprocessed_data_owner(own, "x") == "x"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"3d_fullres": {"inherits_from": "2d"}}, "already makes a configuration named 3d_fullres"),
        ({"bs24": {"batch_size": 24}}, "give the configuration it derives from"),
        ({"bs24": {"inherits_from": "3d_lowres"}}, "inherits_from 3d_lowres, which the plan"),
        ({"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}}, "circular inherits_from"),
        ({"a__b": {"inherits_from": "2d"}}, "no '__'"),
        ({"ensemble_x": {"inherits_from": "2d"}}, "not starting with 'ensemble_'"),
    ],
)
def test_bad_extra_configurations_are_named(classic: dict, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="planning.extra_configurations") as err:
        add_extra_configurations(classic, extra)
    assert message in str(err.value)


def test_resenc_shares_the_default_preprocessing_only_when_identical(classic: dict, resenc_m: dict) -> None:
    for name in ("2d", "3d_fullres"):
        assert resenc_m["configurations"][name]["data_identifier"] == f"nnUNetPlans_{name}"
        assert same_preprocessing(resenc_m, name, classic, name)
    assert not same_preprocessing(resenc_m, "2d", classic, "3d_fullres")
    moved = json.loads(json.dumps(resenc_m))
    moved["configurations"]["3d_fullres"]["spacing"] = [
        1.5,
        1.5,
        1.5,
    ]  # e.g. plans transferred from elsewhere
    assert not same_preprocessing(moved, "3d_fullres", classic, "3d_fullres")


def test_candidate_order_and_parameter_costs(classic: dict, resenc_m: dict) -> None:
    names = [
        "ensemble_3d_fullres+nnUNetResEncUNetMPlans__2d",
        "nnUNetResEncUNetMPlans__3d_fullres",
        "3d_fullres",
        "nnUNetResEncUNetMPlans__2d",
        "2d",
    ]
    assert sorted(names, key=_candidate_sort_key) == [
        "2d",
        "3d_fullres",
        "nnUNetResEncUNetMPlans__2d",
        "nnUNetResEncUNetMPlans__3d_fullres",
        "ensemble_3d_fullres+nnUNetResEncUNetMPlans__2d",
    ]
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2}}
    counts = _parameter_counts(
        ["3d_fullres", "nnUNetResEncUNetMPlans__3d_fullres", "nnUNetResEncUNetMPlans__2d"],
        {"nnUNetPlans": classic, "nnUNetResEncUNetMPlans": resenc_m},
        dataset_json,
    )
    # dynamic_network_architectures' counts for the golden plans (nnunet_v2_extensions.md §2.4)
    assert counts["nnUNetResEncUNetMPlans__3d_fullres"] == 25_895_593
    assert counts["nnUNetResEncUNetMPlans__2d"] == 8_728_681
    assert 0 < counts["3d_fullres"] < counts["nnUNetResEncUNetMPlans__3d_fullres"]


def test_every_planner_plans_from_one_fingerprint() -> None:
    """The same fingerprint gives each preset its plans name, planner and network class."""
    fingerprint = json.loads((FIXTURES / "dataset_fingerprint.json").read_text())
    dataset_json = json.loads((FIXTURES / "dataset.json").read_text())
    for planner, plans_name in [
        ("ExperimentPlanner", "nnUNetPlans"),
        ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    ]:
        plans = plan_experiment(fingerprint, dataset_json, "Dataset004_Hippocampus", planner=planner)
        assert plans["plans_name"] == plans_name and plans["experiment_planner_used"] == planner
