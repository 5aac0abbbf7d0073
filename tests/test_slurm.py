"""The SLURM profile on a real one-node SLURM cluster (issue 6: "runs on SLURM, trainings survive wall time").

``tests/slurm/slurm_local.sh`` installs Debian's SLURM and starts a one-node cluster on this machine (partitions
``cpu`` and ``gpu``, two fake GPUs, accounting in slurmdbd). The shipped ``profiles/slurm/config.yaml``, with only
the site values of ``tests/slurm/profile/config.yaml`` laid over it, then runs a small demo workflow through the
SLURM executor, every job through ``sbatch``. Every training gets a budget of about two minutes but a first
attempt of one minute: SLURM stops it at its wall time (SIGTERM, state TIMEOUT), the trainer saves its state under
``work/``, the profile's ``retries`` resubmit it and it resumes. The tests read ``sacct`` (the job comment is the
rule) and the trainings' epoch logs.

Skipped only where the cluster cannot be installed (not root, no apt-get, apt failed); any other problem fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .test_resume import CONFIGURATION, tiny_dataset, workflow_args
from .test_workflow import workflow_copy

pytestmark = pytest.mark.slow

SCRIPT = REPO / "tests" / "slurm" / "slurm_local.sh"
SHIPPED_PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
SITE_VALUES = REPO / "tests" / "slurm" / "profile" / "config.yaml"
FOLDS = (0, 1)
EPOCHS, ITERATIONS = (
    4,
    20,
)  # ~2 min of training per fold on one core of the CI machine: past the 1-min wall time
FIRST_ATTEMPT_RUNTIME = "1 if attempt == 1 else 60"  # minutes; SLURM enforces it within ~30 s of the limit
RUN_TIMEOUT_S = 1800  # a safety limit only: under pytest-xdist another worker shares the 2 cores
SESSION_LOCK = Path("/var/lib/slurm-local/test-session.lock")
SLURM_CONF = "/etc/slurm/slurm.conf"  # where tests/slurm/slurm_local.sh writes it


def script(command: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def test_shipped_profile_sets_every_rule() -> None:
    """The site template gives every rule of the workflow its own SLURM memory and runtime (a rule left to
    default-resources would be an oversight), and only rules that exist."""
    listed = subprocess.run(
        [sys.executable, "-m", "snakemake", "--list-rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    rules = set(listed) - {"all"}
    profile = yaml.safe_load(SHIPPED_PROFILE.read_text())
    assert rules - set(profile["set-resources"]) == set(), "rules without SLURM settings in profiles/slurm"
    assert set(profile["set-resources"]) == rules, "every rule listed, and no rule that does not exist"
    assert set(profile["set-threads"]) <= set(profile["set-resources"])
    for rule, resources in profile["set-resources"].items():
        assert {"mem_mb", "runtime"} <= set(resources), rule


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A running one-node cluster, stopped afterwards (only the daemons the script started). The cluster is
    machine-wide: a second test session on the same machine waits for this one instead of sharing it."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (apt-get, daemons)")
    SESSION_LOCK.parent.mkdir(parents=True, exist_ok=True)
    # the real config for the script, the daemons and every job (conftest points other tests at an empty one)
    saved_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = SLURM_CONF
    try:
        with open(SESSION_LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            install = script("install", timeout=900)
            if install.returncode == 77:
                pytest.skip(f"SLURM cannot be installed here: {install.stderr.strip()[-500:]}")
            assert install.returncode == 0, (
                f"slurm_local.sh install failed:\n{install.stdout}\n{install.stderr}"
            )
            try:
                start = script("start", timeout=300)
                assert start.returncode == 0, f"slurm_local.sh start failed:\n{start.stdout}\n{start.stderr}"
                yield
            finally:
                stop = script("stop", timeout=300)
                assert stop.returncode == 0, f"slurm_local.sh stop failed:\n{stop.stdout}\n{stop.stderr}"
    finally:
        if saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved_conf


def local_profile(folder: Path) -> dict:
    """profiles/slurm/config.yaml with the test cluster's site values over it (rules in tests/slurm/profile/)."""
    shipped = yaml.safe_load(SHIPPED_PROFILE.read_text())
    site = yaml.safe_load(SITE_VALUES.read_text())
    site_resources = site.pop("set-resources", {})
    every_rule = site_resources.pop("*", {})
    assert not site_resources, "site values may only set resources for every rule ('*')"
    profile = shipped | {key: value for key, value in site.items() if key != "default-resources"}
    profile["default-resources"] = shipped["default-resources"] | site.get("default-resources", {})
    profile["set-resources"] = {
        rule: resources | every_rule for rule, resources in shipped["set-resources"].items()
    }
    # the wall-time scenario: each training's first attempt is stopped by SLURM, the retry finishes it
    profile["set-resources"]["train"]["runtime"] = FIRST_ATTEMPT_RUNTIME
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return profile


@dataclass
class Job:
    """One SLURM allocation from sacct."""

    id: int
    rule: str
    wildcards: str
    state: str
    elapsed: str
    tres: str
    partition: str


def sacct_jobs(workdir: Path, since: str, expected: int) -> list[Job]:
    """The jobs submitted from ``workdir``, once all of them are recorded as finished by slurmdbd."""
    deadline = time.monotonic() + 60
    while True:
        out = subprocess.run(
            [
                "sacct",
                "-a",
                "-X",
                "-P",
                "-n",
                "-S",
                since,
                "-o",
                "JobID,Comment,State,Elapsed,AllocTRES,Partition,WorkDir",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        jobs = []
        for line in out.splitlines():
            job_id, comment, state, elapsed, tres, partition, workdir_ = line.split("|")
            if workdir_ != str(workdir):
                continue
            match = re.fullmatch(r"rule_(\w+?)(?:_wildcards_(.*))?", comment)
            assert match, f"job {job_id}: comment {comment!r} does not name a rule"
            jobs.append(
                Job(int(job_id), match[1], match[2] or "", state.split()[0], elapsed, tres, partition)
            )
        if (
            len(jobs) >= expected and not {"PENDING", "RUNNING", "COMPLETING"} & {j.state for j in jobs}
        ) or time.monotonic() > deadline:
            return sorted(jobs, key=lambda job: job.id)
        time.sleep(2)


@dataclass
class DemoRun:
    wd: Path
    dataset: str
    profile: dict
    output: str
    jobs: list[Job]

    def results(self) -> Path:
        return self.wd / "results" / Path(self.dataset).name


@pytest.fixture(scope="module")
def demo_run(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """The demo (8 cases, 3d_fullres, folds 0 and 1) run to completion through the SLURM executor."""
    wd = workflow_copy(tmp_path_factory.mktemp("slurm"))
    dataset = tiny_dataset(wd, "Dataset911_Slurm")
    profile = local_profile(wd / "slurm_profile")
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    # the SLURM plugin ignores SIGTERM when it hangs (e.g. sacct failing): timeout -k kills it
    cmd = [
        "timeout",
        "-k",
        "10",
        str(RUN_TIMEOUT_S),
        sys.executable,
        "-m",
        "snakemake",
        "--workflow-profile",
        "slurm_profile",
        *workflow_args(dataset, EPOCHS, ITERATIONS),
    ]
    result = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        logs = sorted((wd / ".snakemake" / "slurm_logs").rglob("*.log")) + sorted(
            (wd / "logs").rglob("*.log")
        )
        tails = "\n".join(f"--- {p.relative_to(wd)}\n{p.read_text()[-1500:]}" for p in logs[-8:])
        raise AssertionError(f"snakemake on SLURM failed ({result.returncode}):\n{output[-6000:]}\n{tails}")
    finished = len(re.findall(r"^Finished jobid: \d+ \(Rule: (?!all\))", output, re.M))
    return DemoRun(wd, dataset, profile, output, sacct_jobs(wd, since, finished))


def sacct_table(jobs: list[Job]) -> str:
    return "\n".join(
        f"{j.id:>5} {j.rule:<22} {j.wildcards:<14} {j.partition:<4} {j.state:<10} {j.elapsed} {j.tres}"
        for j in jobs
    )


def test_demo_workflow_runs_through_slurm(demo_run: DemoRun) -> None:
    """Every job went through SLURM, in its profile's partition; GPU rules and only they got a GPU; every
    job's last attempt COMPLETED (earlier ones only where a training hit its wall time); outputs exist."""
    jobs, table = demo_run.jobs, sacct_table(demo_run.jobs)
    print(table)
    ran = {job.rule for job in jobs}
    assert {
        "verify",
        "fingerprint",
        "plan",
        "splits",
        "preprocess",
        "train",
        "validate",
        "select",
        "predict",
    } <= ran, table
    gpu_rules = {
        rule
        for rule, resources in demo_run.profile["set-resources"].items()
        if resources.get("slurm_partition") == "gpu"
    }
    assert {"train", "validate", "predict"} <= gpu_rules
    for job in jobs:
        has_gpu = "gres/gpu=1" in job.tres.split(",")
        assert has_gpu == (job.rule in gpu_rules), f"job {job.id} ({job.rule}): AllocTRES {job.tres}\n{table}"
        assert job.partition == ("gpu" if job.rule in gpu_rules else "cpu"), table
        assert "cpu=1" in job.tres.split(","), (
            table
        )  # max-threads 1 of the site values, cpus_per_gpu: threads
    last = {(job.rule, job.wildcards): job for job in jobs}
    assert {key: job.state for key, job in last.items() if job.state != "COMPLETED"} == {}, table
    assert {(job.rule, job.state) for job in jobs if job not in last.values()} <= {("train", "TIMEOUT")}, (
        table
    )
    assert len([job for job in jobs if job.rule == "train" and job.state == "COMPLETED"]) == len(FOLDS)

    results = demo_run.results()
    assert json.loads((results / "selection.json").read_text())["selected"] == CONFIGURATION
    prediction = json.loads((results / "predictions" / "imagesTs" / "prediction.json").read_text())
    assert prediction
    assert len(list((results / "predictions" / "imagesTs").glob("*.nii.gz"))) == 1
    # the plugin kept the successful jobs' logs (site value slurm-keep-successful-logs)
    assert list((demo_run.wd / ".snakemake" / "slurm_logs" / "rule_predict").rglob("*.log"))


RESUMED = re.compile(
    rf"resuming {CONFIGURATION} fold (\d+) at epoch (\d+)(?:, iteration (\d+))? \(attempt (\d+)\)"
)


def test_training_resumes_after_its_wall_time(demo_run: DemoRun) -> None:
    """Each training's first SLURM job ended TIMEOUT at its 1-minute limit after the trainer saved its state on
    SIGTERM; the resubmitted job COMPLETED by resuming there: the epoch log is unbroken, the epochs before the
    stop carry attempt 1 and the rest attempt 2, and the resumed attempt did not start from scratch."""
    table = sacct_table(demo_run.jobs)
    for fold in FOLDS:
        trains = [
            job
            for job in demo_run.jobs
            # the plugin joins every wildcard value with "_": the default planner's {planner_dir} is empty
            if job.rule == "train" and job.wildcards.removeprefix("_") == f"{CONFIGURATION}_{fold}"
        ]
        assert [job.state for job in trains] == ["TIMEOUT", "COMPLETED"], table
        minutes, seconds = map(int, trains[0].elapsed.split(":")[-2:])
        assert 60 <= 60 * minutes + seconds < 180, (
            f"stopped at {trains[0].elapsed}, the limit is 1 min\n{table}"
        )

        # Snakemake deletes a job's log: before a retry it holds only the last attempt; the first one's output is
        # in its SLURM log, which the plugin keeps for failed jobs
        first = (
            demo_run.wd
            / ".snakemake"
            / "slurm_logs"
            / "rule_train"
            / trains[0].wildcards
            / f"{trains[0].id}.log"
        )
        stopped = first.read_text()
        assert re.search(r"training interrupted by SIGTERM .*; state saved to work/", stopped), stopped[
            -3000:
        ]
        assert "returned non-zero exit status 143" in stopped, stopped[-3000:]  # 128 + SIGTERM

        train_log = (
            demo_run.wd / "logs" / Path(demo_run.dataset).name / f"train_{CONFIGURATION}_fold_{fold}.log"
        ).read_text()
        resumed = [m for m in RESUMED.finditer(train_log) if int(m[1]) == fold]
        assert len(resumed) == 1, train_log[-3000:]
        epoch, iteration, attempt = int(resumed[0][2]), int(resumed[0][3] or 0), int(resumed[0][4])
        assert attempt == 2 and (epoch, iteration) != (0, 0), resumed[0][0]

        log = json.loads(
            (demo_run.results() / "training" / CONFIGURATION / f"fold_{fold}" / "log.json").read_text()
        )
        assert [entry["epoch"] for entry in log] == list(range(EPOCHS))
        assert [entry["attempt"] for entry in log] == [1] * epoch + [2] * (EPOCHS - epoch), log
