"""Stage targets (workflow/rules/targets.smk): `snakemake preprocess_all` / `train_all` run up to that stage.

The plan is a checkpoint: a dry run before it has run lists the jobs up to the plan and the target only (what
follows is decided by the plan). So each target is dry-run twice: on a fresh folder, then after the plan has run
for real (seconds on the demo), when the dry run lists exactly the preprocess (and splits, train) jobs.
`--until preprocess` cannot see the jobs the checkpoint decides; the workflow says so instead of doing nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_workflow import DEMO, job_counts, snakemake, workflow_copy

CONFIG = ("--config", f"dataset={DEMO}")
UP_TO_THE_PLAN = {"verify": 1, "fingerprint": 1, "plan": 1}
N_FOLDS = 5  # config/config.yaml's folds
DEMO_CONFIGURATIONS = 2  # the demo plans 2d and 3d_fullres


def dry_run(wd: Path, *args: str) -> dict[str, int]:
    result = snakemake(wd, "-n", *CONFIG, *args)
    return job_counts(result.stdout + result.stderr)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workflow_copy(tmp_path_factory.mktemp("targets"))


def test_stage_targets_before_the_plan_schedule_everything_up_to_it(fresh: Path) -> None:
    assert dry_run(fresh, "--", "preprocess_all") == {**UP_TO_THE_PLAN, "preprocess_all": 1}
    assert dry_run(fresh, "--", "train_all") == {**UP_TO_THE_PLAN, "train_all": 1}
    assert dry_run(fresh, "--until", "preprocess_all") == {**UP_TO_THE_PLAN, "preprocess_all": 1}


def test_until_a_rule_the_plan_decides_names_the_stage_targets(fresh: Path) -> None:
    for rule in ("preprocess", "train"):
        result = snakemake(fresh, "-n", *CONFIG, "--until", rule, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert (
            f"--until {rule} cannot work here" in output
            and "preprocess_all" in output
            and "train_all" in output
        )


def test_stage_targets_after_the_plan_schedule_exactly_their_stage(tmp_path: Path) -> None:
    wd = workflow_copy(tmp_path)
    plan = snakemake(wd, *CONFIG, "--", f"results/{DEMO.name}/plans.json")
    assert job_counts(plan.stdout + plan.stderr) == UP_TO_THE_PLAN
    assert dry_run(wd, "--", "preprocess_all") == {"preprocess": DEMO_CONFIGURATIONS, "preprocess_all": 1}
    assert dry_run(wd, "--", "train_all") == {
        "preprocess": DEMO_CONFIGURATIONS,
        "splits": 1,
        "train": DEMO_CONFIGURATIONS * N_FOLDS,
        "train_all": 1,
    }
    two_folds = snakemake(wd, "-n", *CONFIG, "folds=[0,1]", "--until", "train_all")
    assert job_counts(two_folds.stdout + two_folds.stderr) == {
        "preprocess": DEMO_CONFIGURATIONS,
        "splits": 1,
        "train": DEMO_CONFIGURATIONS * 2,
        "train_all": 1,
    }
    assert not (wd / "results" / DEMO.name / "preprocessed").exists()
