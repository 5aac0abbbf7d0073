"""`snakemake --report` on a finished demo run: every plot and table is in the report, with its caption."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from .test_workflow import DEMO, snakemake

pytestmark = pytest.mark.slow

FOLDS = (0, 1, 2, 3, 4)  # the report must hold a plot for each fold that was trained


def embedded_object(page: str, name: str) -> dict:
    """The JSON object the report's app holds in ``var <name> = {...}`` (results, categories)."""
    match = re.search(rf"\b{name} = (?=\{{)", page)
    assert match, f"report has no '{name}' object"
    value, _ = json.JSONDecoder().raw_decode(page, match.end())
    return value


def embedded_file(entry: dict) -> bytes:
    assert entry["data_uri"].startswith("data:"), "results must be embedded in the self-contained report"
    return base64.b64decode(entry["data_uri"].split("base64,", 1)[1])


def test_report_holds_progress_plots_crossval_table_bootstrap_and_postprocessing(finished_demo: Path) -> None:
    wd = finished_demo  # the default target includes the report tables
    config = ["--config", f"dataset={DEMO}"]
    rel = f"results/{DEMO.name}"

    again = snakemake(wd, *config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr  # the tables are final outputs, written once
    snakemake(wd, *config, "--report", "report.html")
    page = (wd / "report.html").read_text()
    results = embedded_object(page, "results")
    categories = embedded_object(page, "categories")
    assert "system-message" not in page  # captions and workflow description are valid reStructuredText
    assert DEMO.name in page and "bootstrap resamples" in page  # the workflow description was rendered

    for configuration in ("2d", "3d_fullres"):
        plots = [f"{rel}/training/{configuration}/fold_{fold}/progress.png" for fold in FOLDS]
        assert categories["Training"][configuration] == plots
        for fold, path in zip(FOLDS, plots, strict=True):
            entry = results[path]
            assert entry["mime_type"] == "image/png" and entry["labels"] == {
                "configuration": configuration,
                "fold": str(fold),
            }
            assert embedded_file(entry) == (wd / path).read_bytes()
            assert f"<strong>{configuration}</strong>, fold {fold}" in entry["caption"]

    selection = [path for paths in categories["Model selection"].values() for path in paths]
    expected = {
        f"{rel}/bootstrap.png": "image/png",
        f"{rel}/report/crossval.html": "text/html",
        f"{rel}/report/postprocessing.html": "text/html",
        f"{rel}/postprocessing.json": "application/json",
    }
    assert set(expected) <= set(selection)
    for path, mime in expected.items():
        assert results[path]["mime_type"] == mime and len(results[path]["caption"]) > 200, path

    chosen = json.loads((wd / rel / "selection.json").read_text())["selected"]
    table = embedded_file(results[f"{rel}/report/crossval.html"]).decode()
    assert f"Selected: <b>{chosen}</b>" in table
    for candidate in ("2d", "3d_fullres", "ensemble_2d+3d_fullres"):
        assert f">{candidate}</td>" in table
    for column in (
        "Dice Anterior (1)",
        "Dice Posterior (2)",
        "foreground mean Dice",
        "95 % CI low",
        "P(best)",
    ):
        assert column in table
    csv = (wd / rel / "report" / "crossval.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("candidate,Dice Anterior (1),Dice Posterior (2)")

    decision = json.loads((wd / rel / "postprocessing.json").read_text())
    postprocessing = embedded_file(results[f"{rel}/report/postprocessing.html"]).decode()
    assert f"Candidate <b>{decision['selected']}</b>" in postprocessing
    assert postprocessing.count(">applied</td>") == len(decision["steps"])
    assert postprocessing.count(">rejected</td>") == len(decision["trials"]) - len(decision["steps"])
