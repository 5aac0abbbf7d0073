"""The report tables (nnsnake.reporting): right numbers in the right cells, the choice marked, readable pages."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from nnsnake import jsonio
from nnsnake.reporting import (
    crossval_table,
    label_names,
    postprocessing_table,
    write_crossval_report,
    write_postprocessing_report,
)

DATASET_JSON = {"labels": {"background": 0, "Anterior": 1, "Posterior": 2}, "file_ending": ".nii.gz"}
ENS = "ensemble_2d+3d_fullres"


def summary(dice_1: float, dice_2: float) -> dict:
    return {
        "mean": {"1": {"Dice": dice_1, "IoU": 0.0}, "2": {"Dice": dice_2, "IoU": 0.0}},
        "foreground_mean": {"Dice": (dice_1 + dice_2) / 2},
        "metric_per_case": [],
    }


def bootstrap(selected: str = "3d_fullres", nnunet_choice: str = "3d_fullres") -> dict:
    candidates = {
        "2d": {"score": 0.70, "bootstrap_mean": 0.69, "ci_low": 0.60, "ci_high": 0.78, "p_best": 0.1},
        "3d_fullres": {"score": 0.80, "bootstrap_mean": 0.81, "ci_low": 0.75, "ci_high": 0.85, "p_best": 0.6},
        ENS: {"score": 0.79, "bootstrap_mean": 0.79, "ci_low": 0.74, "ci_high": 0.84, "p_best": 0.3},
    }
    return {
        "candidates": candidates,
        "order": ["2d", "3d_fullres", ENS],
        "labels": ["1", "2"],
        "selected": selected,
        "nnunet_choice": nnunet_choice,
        "confidence": 0.95,
        "n_bootstrap": 1000,
        "seed": 1,
        "n_cases": 20,
        "min_win_share": 0.5,
    }


SUMMARIES = {ENS: summary(0.78, 0.80), "3d_fullres": summary(0.82, 0.78), "2d": summary(0.75, 0.65)}


def test_label_names_skip_background_and_name_regions() -> None:
    assert label_names(DATASET_JSON) == {"1": "Anterior (1)", "2": "Posterior (2)"}
    regions = {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "ignore": 4},
        "regions_class_order": [1, 2],
    }
    assert label_names(regions) == {"(1, 2, 3)": "whole (1, 2, 3)", "(2, 3)": "core (2, 3)"}


def test_crossval_table_rows_columns_and_choice() -> None:
    table = crossval_table(SUMMARIES, bootstrap(), label_names(DATASET_JSON))
    assert list(table["candidate"]) == ["2d", "3d_fullres", ENS]  # the bootstrap's order, not the mapping's
    assert list(table.columns) == [
        "candidate",
        "Dice Anterior (1)",
        "Dice Posterior (2)",
        "foreground mean Dice",
        "bootstrap mean",
        "95 % CI low",
        "95 % CI high",
        "P(best)",
        "choice",
    ]
    row = table.set_index("candidate").loc["3d_fullres"]
    assert row["Dice Anterior (1)"] == 0.82 and row["Dice Posterior (2)"] == 0.78
    assert row["foreground mean Dice"] == pytest.approx(0.80)
    assert (row["bootstrap mean"], row["95 % CI low"], row["95 % CI high"], row["P(best)"]) == (
        0.81,
        0.75,
        0.85,
        0.6,
    )
    assert list(table["choice"]) == ["", "selected, nnU-Net's choice", ""]
    changed = crossval_table(SUMMARIES, bootstrap(selected="2d"), label_names(DATASET_JSON))
    assert list(changed["choice"]) == ["selected", "nnU-Net's choice", ""]


def test_crossval_table_keeps_candidates_without_bootstrap() -> None:
    """A candidate missing from bootstrap.json stays in the table with empty bootstrap cells."""
    table = crossval_table(SUMMARIES | {"3d_lowres": summary(0.5, 0.5)}, bootstrap())
    last = table.iloc[-1]
    assert last["candidate"] == "3d_lowres" and last["Dice 1"] == 0.5
    assert math.isnan(last["P(best)"]) and last["choice"] == ""


def decision() -> dict:
    def scores(fg, d1, d2):
        return {"foreground_mean": fg, "mean": {"1": d1, "2": d2}}

    step_all = {"labels": [1, 2], "operation": "keep_largest_component", "scope": "all_foreground"}
    step_2 = {"labels": [2], "operation": "keep_largest_component", "scope": "2"}
    return {
        "selected": "3d_fullres",
        "n_cases": 20,
        "labels_or_regions": ["1", "2"],
        "steps": [step_all],
        "result_on_crossval_pre_pp": 0.60,
        "result_on_crossval_post_pp": 0.65,
        "trials": [
            {
                "accepted": True,
                "step": step_all,
                "rule": "foreground higher",
                "before": scores(0.60, 0.6, 0.6),
                "after": scores(0.65, 0.7, 0.6),
            },
            {
                "accepted": False,
                "step": step_2,
                "rule": "label 2 higher",
                "before": scores(0.65, 0.7, 0.6),
                "after": scores(0.55, 0.7, 0.4),
            },
        ],
    }


def test_postprocessing_table_one_row_per_trial() -> None:
    table = postprocessing_table(decision(), label_names(DATASET_JSON))
    assert list(table[("keep the largest component of", "")]) == [
        "whole foreground (labels 1, 2)",
        "label Posterior (2)",
    ]
    assert list(table[("decision", "")]) == ["applied", "rejected"]
    assert list(table[("foreground mean Dice", "before")]) == [0.60, 0.65]
    assert list(table[("Dice Posterior (2)", "after")]) == [0.6, 0.4]
    assert postprocessing_table({"trials": []}).empty


def test_pages_are_self_contained_and_say_the_decision(tmp_path) -> None:
    dataset = tmp_path / "Dataset001_Test"
    jsonio.write_json(dataset / "dataset.json", DATASET_JSON)
    paths = {}
    for name, content in SUMMARIES.items():
        paths[name] = tmp_path / "crossval" / name / "summary.json"
        jsonio.write_json(paths[name], content)
    jsonio.write_json(tmp_path / "bootstrap.json", bootstrap())
    table = write_crossval_report(
        paths,
        tmp_path / "bootstrap.json",
        dataset / "dataset.json",
        tmp_path / "crossval.html",
        tmp_path / "crossval.csv",
    )
    page = (tmp_path / "crossval.html").read_text()
    assert "Dataset001_Test" in page and "Selected: <b>3d_fullres</b>" in page and "0.8200" in page
    assert "<script" not in page and "http" not in page  # shown in the report's frame as a data URI
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "crossval.csv", keep_default_na=False, na_values=[""]).fillna({"choice": ""}),
        table,
    )
    again = tmp_path / "again.html"
    write_crossval_report(paths, tmp_path / "bootstrap.json", dataset / "dataset.json", again)
    assert again.read_bytes() == (tmp_path / "crossval.html").read_bytes()  # deterministic bytes

    jsonio.write_json(tmp_path / "postprocessing.json", decision())
    write_postprocessing_report(
        tmp_path / "postprocessing.json", dataset / "dataset.json", tmp_path / "pp.html"
    )
    page = (tmp_path / "pp.html").read_text()
    assert "keep the largest connected component of <b>whole foreground (labels 1, 2)</b>" in page
    assert "0.6000 without and 0.6500 with" in page and "rejected" in page
    empty = decision() | {"steps": [], "result_on_crossval_post_pp": 0.60}
    jsonio.write_json(tmp_path / "postprocessing.json", empty)
    write_postprocessing_report(
        tmp_path / "postprocessing.json", dataset / "dataset.json", tmp_path / "pp.html"
    )
    assert "Applied at prediction time: <b>nothing</b>" in (tmp_path / "pp.html").read_text()
