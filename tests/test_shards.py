"""Preprocessing shards in the workflow (config ``preprocessing.shards``, issue #15).

With ``shards: n > 1`` each configuration's preprocessing runs as n ``preprocess_shard`` jobs, each writing its
cases into the preprocessed folder and a manifest ``shards/<i>_of_<n>.json``; ``preprocess`` merges those into
the usual ``manifest.json``. The files must be those of one job, and the SLURM profile must give the shard jobs
their resources. The plan is a checkpoint, so the tests run the demo up to its plans.json first (seconds).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from nnsnake import steps
from nnsnake.errors import PreprocessingError
from nnsnake.jsonio import write_json

from .test_workflow import DEMO, REPO, job_counts, snakemake, workflow_copy

CONFIG = ("--config", f"dataset={DEMO}")
THREE_SHARDS = "preprocessing={shards: 3}"
RESULTS = f"results/{DEMO.name}"
PREPROCESSED = f"{RESULTS}/preprocessed/3d_fullres"
MANIFEST = f"{PREPROCESSED}/manifest.json"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workflow copy in which the demo has run up to its plans (the preprocess jobs are known from here)."""
    wd = workflow_copy(tmp_path_factory.mktemp("shards"))
    snakemake(wd, *CONFIG, "--", f"{RESULTS}/plans.json")
    return wd


def dry_run_jobs(output: str, rule: str) -> list[dict[str, str]]:
    """The wildcards and resources lines of each job of ``rule`` in a dry run's output."""
    jobs = []
    for block in output.split("\n\n"):
        lines = [line.strip() for line in block.splitlines()]
        if f"rule {rule}:" not in lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines if ": " in line)
        jobs.append({key: fields.get(key, "") for key in ("wildcards", "resources", "output")})
    return jobs


def test_three_shards_are_scheduled_with_the_slurm_profile_resources(planned: Path) -> None:
    """One shard job per shard, the merging preprocess after them; the SLURM profile gives the shard jobs the
    preprocess job's CPU resources. With the default (1 shard) the jobs are those of before: one preprocess."""
    assert job_counts(snakemake(planned, "-n", *CONFIG, "--", MANIFEST).stdout) == {"preprocess": 1}

    result = snakemake(
        planned, "-n", "--workflow-profile", "profiles/slurm", *CONFIG, THREE_SHARDS, "--", MANIFEST
    )
    output = result.stdout + result.stderr
    assert job_counts(output) == {"preprocess_shard": 3, "preprocess": 1}
    shards = dry_run_jobs(output, "preprocess_shard")
    assert sorted(job["output"] for job in shards) == [
        f"{PREPROCESSED}/shards/{i}_of_3.json" for i in range(3)
    ]
    assert sorted(job["wildcards"] for job in shards) == [
        f"planner_dir=, configuration=3d_fullres, shard={i}, shards=3" for i in range(3)
    ]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["set-resources"]["preprocess_shard"] == profile["set-resources"]["preprocess"]
    assert profile["set-threads"]["preprocess_shard"] == profile["set-threads"]["preprocess"]
    expected = {f"{key}={value}" for key, value in profile["set-resources"]["preprocess"].items()}
    expected |= {f"slurm_partition={profile['default-resources']['slurm_partition']}"}
    for job in shards:
        assert expected <= set(job["resources"].split(", ")), job
    (merge,) = dry_run_jobs(output, "preprocess")
    assert merge["output"] == MANIFEST


@pytest.mark.parametrize("value", ["0", "three", "2.5"])
def test_shards_must_be_a_whole_number_of_at_least_one(planned: Path, value: str) -> None:
    result = snakemake(planned, "-n", *CONFIG, f"preprocessing={{shards: {value}}}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "config preprocessing.shards is" in output and "must be a whole number >= 1" in output, output[
        -3000:
    ]


def test_merge_needs_every_shard_of_one_count(tmp_path: Path) -> None:
    """The merge step refuses an incomplete or mixed set of shard manifests, and manifests of another folder."""
    folder = tmp_path / "preprocessed" / "3d_fullres"
    head = {"configuration": "3d_fullres", "data_identifier": "x", "format": "f"}
    paths = []
    for i, case in enumerate(["a", "b", "c"]):
        paths.append(folder / "shards" / f"{i}_of_3.json")
        write_json(paths[-1], {**head, "cases": {case: {"shape": [1]}}})
    with pytest.raises(PreprocessingError, match="shards 0 to n-1"):
        steps.merge_preprocess_shards(paths[:2], folder / "manifest.json")
    write_json(folder / "shards" / "2_of_4.json", {**head, "cases": {}})
    with pytest.raises(PreprocessingError, match="shards 0 to n-1"):
        steps.merge_preprocess_shards(
            [*paths[:2], folder / "shards" / "2_of_4.json"], folder / "manifest.json"
        )
    with pytest.raises(PreprocessingError, match="another folder"):
        steps.merge_preprocess_shards(paths, tmp_path / "manifest.json")
    merged = steps.merge_preprocess_shards(list(reversed(paths)), folder / "manifest.json")
    assert list(merged["cases"]) == ["a", "b", "c"] and (folder / "manifest.json").is_file()


def preprocessed_files(wd: Path) -> dict[str, bytes]:
    """Every file of the preprocessed folder but the shard manifests, by name."""
    folder = wd / PREPROCESSED
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_three_shards_preprocess_the_same_files_as_one(planned: Path, tmp_path: Path) -> None:
    """The demo's 3d_fullres preprocessed with 3 shard jobs, two at a time: byte-identical to one preprocess job,
    manifest.json included, and a stale case (no longer in the dataset) removed by shard 0 while the others
    write; a second run has nothing to do."""
    one, three = tmp_path / "one", tmp_path / "three"
    shutil.copytree(planned, one, symlinks=True)
    shutil.copytree(planned, three, symlinks=True)
    run = snakemake(one, *CONFIG, "--", MANIFEST)
    assert job_counts(run.stdout + run.stderr) == {"preprocess": 1}
    (three / PREPROCESSED).mkdir(parents=True)
    for path in (one / PREPROCESSED).glob("hippocampus_001*"):
        shutil.copy(path, three / PREPROCESSED / path.name.replace("_001", "_999"))
    run = snakemake(three, *CONFIG, THREE_SHARDS, "--set-threads", "preprocess_shard=1", "--", MANIFEST)
    assert job_counts(run.stdout + run.stderr) == {"preprocess_shard": 3, "preprocess": 1}
    assert (
        "removing hippocampus_999: no longer in the dataset"
        in (three / "logs" / DEMO.name / "preprocess_shard_3d_fullres_0_of_3.log").read_text()
    )

    expected = preprocessed_files(one)
    assert len(expected) == 1 + 4 * 24  # manifest.json + 4 files for each of the demo's 24 cases
    sharded = preprocessed_files(three)
    assert sorted(sharded) == sorted(expected)
    assert [name for name in expected if sharded[name] != expected[name]] == []
    assert sorted(p.name for p in (three / PREPROCESSED / "shards").iterdir()) == [
        f"{i}_of_3.json" for i in range(3)
    ]
    again = snakemake(three, "-n", *CONFIG, THREE_SHARDS, "--", MANIFEST)
    assert job_counts(again.stdout + again.stderr) == {}
