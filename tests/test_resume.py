"""Kill tests through the real Snakemake workflow (issue 4 "resume test", issue 6 "kill tests").

Each test runs the workflow on eight demo cases (3d_fullres, folds 0 and 1, a budget of a few epochs), kills
it the way a machine or a user does, runs the same command again and checks what the promise says: the
workflow completes, finished jobs are not redone, and an interrupted training continues from its last
checkpoint with an unbroken epoch log instead of starting over.

Kills are real signals to real processes: snakemake is started with ``subprocess.Popen`` in its own session,
the trainer is the ``.snakemake/scripts/*.train.py`` process among its descendants, and the moment of the kill
is chosen from the trainer's resumable state (``work/<DS>/training/<cfg>/fold_<k>/log.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from .test_workflow import DEMO, job_counts, snakemake, workflow_copy

pytestmark = pytest.mark.slow

CONFIGURATION = "3d_fullres"
WAIT_S = 600  # the longest a test waits for a training to reach a kill point (2 loaded cores)


# --------------------------------------------------------------------------------------------------------------
# helpers (test_invalidation.py uses tiny_dataset and executed_jobs too)


def tiny_dataset(wd: Path, name: str, n_cases: int = 8) -> str:
    """The first ``n_cases`` demo cases plus one test image, as ``<wd>/data/<name>``; returns the relative path.

    The dataset lives inside the workflow folder and is named by a relative path, so a copy of the folder
    (results, metadata and data) is the same workflow with the same config.
    """
    dataset = wd / "data" / name
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / sub).mkdir(parents=True)
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (DEMO / "imagesTr").glob("*_0000.nii.gz"))
    for case in cases[:n_cases]:
        shutil.copy(DEMO / "imagesTr" / f"{case}_0000.nii.gz", dataset / "imagesTr")
        shutil.copy(DEMO / "labelsTr" / f"{case}.nii.gz", dataset / "labelsTr")
    shutil.copy(sorted((DEMO / "imagesTs").iterdir())[0], dataset / "imagesTs")
    dataset_json = json.loads((DEMO / "dataset.json").read_text())
    dataset_json["numTraining"] = n_cases
    (dataset / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return f"data/{name}"


_JOB_BLOCK = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*\n?)+)", re.M)


def executed_jobs(output: str) -> dict[str, tuple[str, list[str]]]:
    """Jobs a snakemake run started (or a dry run lists): jobid -> (rule, declared outputs)."""
    jobs = {}
    for rule, body in _JOB_BLOCK.findall(output):
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        if "jobid" in fields:
            outputs = [p for p in fields.get("output", "").split(", ") if p]
            jobs[fields["jobid"]] = (rule, outputs)
    return jobs


def finished_outputs(output: str) -> set[str]:
    """Declared outputs of the jobs a snakemake run reported as finished."""
    jobs = executed_jobs(output)
    finished = re.findall(r"^Finished jobid: (\d+) \(Rule: \w+\)", output, re.M)
    return {path for jobid in finished for path in jobs[jobid][1]}


class Run:
    """A snakemake run in the background (own session, so its process group is snakemake plus its jobs)."""

    def __init__(self, wd: Path, args: tuple[str, ...], name: str) -> None:
        self.log_path = wd / f"{name}.out"
        cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]  # as tests.test_workflow.snakemake
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=wd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"snakemake ended (status {self.proc.returncode}) before {what}:\n{self.output()[-6000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.output()[-6000:]}")

    def trainer(self) -> psutil.Process:
        """The training job's main process (not its augmentation workers, which are its children)."""
        trainers = [p for p in _descendants(self.proc.pid) if _is_trainer(p) and not _is_trainer(p.parent())]
        assert len(trainers) == 1, f"expected one running training job, found {trainers}"
        return trainers[0]

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_trainer(process: psutil.Process | None) -> bool:
    try:
        return process is not None and any(arg.endswith(".train.py") for arg in process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


@contextlib.contextmanager
def background(wd: Path, args: tuple[str, ...], name: str) -> Iterator[Run]:
    """Start a run; whatever happens in the test, nothing of it is left running afterwards."""
    run = Run(wd, args, name)
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill_group()


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie may linger where PID 1 does not reap)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_and_reap(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def state_log(wd: Path, dataset: str, fold: int) -> list[dict]:
    """The trainer's running log (refreshed after every epoch, atomically), [] before the first epoch."""
    path = wd / "work" / Path(dataset).name / "training" / CONFIGURATION / f"fold_{fold}" / "log.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def fold_output(wd: Path, dataset: str, fold: int, name: str = "model_final.pt") -> Path:
    return wd / "results" / Path(dataset).name / "training" / CONFIGURATION / f"fold_{fold}" / name


def train_log(wd: Path, dataset: str, fold: int) -> str:
    return (wd / "logs" / Path(dataset).name / f"train_{CONFIGURATION}_fold_{fold}.log").read_text()


def assert_continued(final: list[dict], before_kill: list[dict], epochs: int) -> tuple[int, int]:
    """The final log has every epoch once and starts with the entries logged before the kill; from the last
    checkpoint on, the epochs were run by the next attempt, which resumed there instead of starting over.
    Returns the epoch and the attempt number where the resumed attempt took over."""
    assert [entry["epoch"] for entry in final] == list(range(epochs))
    assert before_kill and final[: len(before_kill)] == before_kill, (
        "entries logged before the kill were changed"
    )
    killed_attempt = before_kill[-1]["attempt"]
    resumed_at = next(i for i, entry in enumerate(final) if entry["attempt"] > killed_attempt)
    assert len(before_kill) <= resumed_at < epochs, (resumed_at, len(before_kill))
    attempts = [entry["attempt"] for entry in final]
    assert attempts == sorted(attempts) and attempts[resumed_at] == killed_attempt + 1, attempts
    return resumed_at, attempts[resumed_at]


def workflow_args(dataset: str, epochs: int, iterations: int, *extra_training: str) -> tuple[str, ...]:
    training = ", ".join(
        [f"epochs: {epochs}", f"iterations_per_epoch: {iterations}", "val_iterations: 1", *extra_training]
    )
    return (
        "--config",
        f"dataset={dataset}",
        "folds=[0,1]",
        f"configurations=[{CONFIGURATION}]",
        f"training={{{training}}}",
        "inference={mirroring: false}",
    )


# --------------------------------------------------------------------------------------------------------------
# tests


def test_killed_training_job_and_killed_snakemake_both_resume(tmp_path: Path) -> None:
    """Two kills in one workflow run, each followed by the same command again.

    1. SIGKILL of a training job after its first finished epoch (an OOM kill, a crashed node's job): snakemake
       fails the job; the same command continues that fold from its last checkpoint (epoch log unbroken, the
       resumed epochs carry the next attempt number) and goes on.
    2. SIGKILL of snakemake and all its jobs (its process group: a lost login node or session) when one fold is
       finished and the other is training: after ``--unlock`` the same command redoes no finished job (none is
       started again, no finished output is rewritten), resumes the interrupted fold from its checkpoint, and
       completes the workflow through prediction.
    """
    wd = workflow_copy(tmp_path)
    dataset = tiny_dataset(wd, "Dataset907_Resume")
    epochs = 4
    args = workflow_args(dataset, epochs, 1)

    with background(wd, args, "run1") as run1:
        [first] = run1.wait_until(
            lambda: [f for f in (0, 1) if state_log(wd, dataset, f)], "a training to finish its first epoch"
        )
        trainer = run1.trainer()
        killed_first = state_log(wd, dataset, first)
        trainer.send_signal(signal.SIGKILL)
        assert run1.proc.wait(timeout=WAIT_S) != 0, "snakemake must report the killed training job as failed"
    assert not fold_output(wd, dataset, first).exists()
    assert len(killed_first) < epochs - 1, "the kill came too late"

    # Which fold snakemake runs first is its choice: kill once one fold is finished and the other has logged an
    # epoch more than before this run.
    logged_before = {fold: len(state_log(wd, dataset, fold)) for fold in (0, 1)}

    def one_finished_other_training() -> tuple[int, int] | None:
        finished = [fold for fold in (0, 1) if fold_output(wd, dataset, fold).exists()]
        if len(finished) != 1:
            return None
        other = 1 - finished[0]
        return (finished[0], other) if len(state_log(wd, dataset, other)) > logged_before[other] else None

    with background(wd, args, "run2") as run2:
        done, interrupted = run2.wait_until(
            one_finished_other_training, "one fold to finish and the other to log an epoch"
        )
        killed_second = state_log(wd, dataset, interrupted)
        run2.trainer()  # the interrupted fold is training now
        group = _descendants(run2.proc.pid)
        run2.kill_group()
        assert not [p for p in psutil.wait_procs(group, timeout=30)[1] if alive(p)]  # workers died too
    assert not fold_output(wd, dataset, interrupted).exists()
    assert len(killed_second) < epochs, "the kill came too late"
    if done == first:  # the fold killed in run 1 was resumed and finished by run 2
        epoch, attempt = assert_continued(
            json.loads(fold_output(wd, dataset, first, "log.json").read_text()), killed_first, epochs
        )
        assert f"resuming {CONFIGURATION} fold {first} at epoch {epoch} (attempt {attempt})" in train_log(
            wd, dataset, first
        )

    finished = finished_outputs(run1.output()) | finished_outputs(run2.output())
    mtimes = {path: (wd / path).stat().st_mtime_ns for path in finished}
    assert f"results/{Path(dataset).name}/plans.json" in mtimes

    snakemake(wd, "--unlock", *args)  # a killed snakemake leaves its lock behind (LockException otherwise)
    run3 = snakemake(wd, *args)
    jobs3 = executed_jobs(run3.stdout + run3.stderr)

    redone = [(rule, outputs) for rule, outputs in jobs3.values() if set(outputs) & finished]
    assert not redone, f"finished jobs were run again: {redone}"
    assert {path: (wd / path).stat().st_mtime_ns for path in finished} == mtimes
    trains = [outputs[0] for rule, outputs in jobs3.values() if rule == "train"]
    assert trains == [str(fold_output(wd, dataset, interrupted).relative_to(wd))]
    epoch, attempt = assert_continued(
        json.loads(fold_output(wd, dataset, interrupted, "log.json").read_text()), killed_second, epochs
    )
    assert f"resuming {CONFIGURATION} fold {interrupted} at epoch {epoch} (attempt {attempt})" in train_log(
        wd, dataset, interrupted
    )
    assert_continued(
        json.loads(fold_output(wd, dataset, first, "log.json").read_text()), killed_first, epochs
    )
    results = wd / "results" / Path(dataset).name
    assert (results / "selection.json").exists()
    assert (results / "predictions" / "imagesTs" / "prediction.json").exists()


def test_deterministic_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    """Deterministic mode on CPU: a training killed (SIGKILL after epoch 0) and then stopped again mid-epoch
    (SIGTERM, SLURM's wall-time signal: the trainer saves a mid-epoch checkpoint and exits non-zero) ends, after
    the same command run three times, with final weights equal bit for bit to an uninterrupted run's, and with
    the same losses and pseudo-Dice in every epoch of its log."""
    wd = workflow_copy(tmp_path)
    dataset = tiny_dataset(wd, "Dataset908_Deterministic")
    epochs = 3
    args = (
        *workflow_args(dataset, epochs, 2, "deterministic: true"),
        "--",
        str(fold_output(wd, dataset, 0).relative_to(wd)),
    )

    snakemake(wd, *args)  # uninterrupted reference
    reference = torch.load(fold_output(wd, dataset, 0), map_location="cpu", weights_only=True)
    reference_log = json.loads(fold_output(wd, dataset, 0, "log.json").read_text())
    shutil.rmtree(fold_output(wd, dataset, 0).parent)
    shutil.rmtree(wd / "work" / Path(dataset).name / "training" / CONFIGURATION / "fold_0")

    with background(wd, args, "killed") as run:
        run.wait_until(lambda: state_log(wd, dataset, 0), "epoch 0 to finish")
        before_kill = state_log(wd, dataset, 0)
        run.trainer().send_signal(signal.SIGKILL)
        assert run.proc.wait(timeout=WAIT_S) != 0
    with background(wd, args, "terminated") as run:
        run.wait_until(lambda: len(state_log(wd, dataset, 0)) >= 2, "epoch 1 to finish")
        time.sleep(0.5)  # into epoch 2
        before_term = state_log(wd, dataset, 0)
        run.trainer().send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=WAIT_S) != 0
    assert "training interrupted by SIGTERM" in train_log(wd, dataset, 0)
    assert not fold_output(wd, dataset, 0).exists()
    snakemake(wd, *args)

    final_log = json.loads(fold_output(wd, dataset, 0, "log.json").read_text())
    assert_continued(final_log, before_kill, epochs)
    epoch, attempt = assert_continued(final_log, before_term, epochs)
    assert attempt == 3 and f"resuming {CONFIGURATION} fold 0 at epoch {epoch}" in train_log(wd, dataset, 0)
    deterministic_keys = ("train_loss", "val_loss", "pseudo_dice", "mean_fg_dice", "ema_pseudo_dice", "lr")
    for resumed_entry, reference_entry in zip(final_log, reference_log, strict=True):
        assert {k: resumed_entry[k] for k in deterministic_keys} == {
            k: reference_entry[k] for k in deterministic_keys
        }
    resumed = torch.load(fold_output(wd, dataset, 0), map_location="cpu", weights_only=True)
    assert resumed["network_weights"].keys() == reference["network_weights"].keys()
    unequal = [
        name
        for name, tensor in reference["network_weights"].items()
        if not torch.equal(tensor, resumed["network_weights"][name])
    ]
    assert not unequal, f"weights differ from the uninterrupted run in {unequal}"


def test_snakemake_killed_alone_then_same_command_completes(tmp_path: Path) -> None:
    """SIGKILL of the snakemake process only (``kill -9 <pid>``): its running training job is not killed with it
    and goes on as an orphan, holding the fold's lock. After ``--unlock`` the same command, started while the
    orphan still runs, must complete without two copies training the fold at once and without starting the
    fold over: the fold's epoch log is the orphan's, unbroken.

    The orphan is suspended (SIGSTOP) from the kill until the rerun's training job has met its lock, so the
    test does not depend on which of the two would otherwise reach the end first."""
    wd = workflow_copy(tmp_path)
    dataset = tiny_dataset(wd, "Dataset909_Orphan")
    epochs = 3
    args = (*workflow_args(dataset, epochs, 1), "--", str(fold_output(wd, dataset, 0).relative_to(wd)))
    orphans: list[psutil.Process] = []
    try:
        with background(wd, args, "killed") as run:
            run.wait_until(lambda: state_log(wd, dataset, 0), "epoch 0 to finish")
            trainer = run.trainer()
            orphans = [trainer, *trainer.children(recursive=True)]
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait()
        for process in orphans:
            process.suspend()
        before_kill = state_log(wd, dataset, 0)
        assert alive(trainer) and len(before_kill) < epochs
        snakemake(wd, "--unlock", *args)
        with background(wd, args, "rerun") as rerun:
            deadline = time.monotonic() + WAIT_S
            while rerun.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(FileNotFoundError):
                    if "already being trained by" in train_log(wd, dataset, 0):
                        break
                time.sleep(0.1)
            for process in orphans:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.resume()
            assert rerun.proc.wait(timeout=WAIT_S) == 0, rerun.output()[-4000:]
        assert job_counts(rerun.output()) == {"train": 1}
        final_log = json.loads(fold_output(wd, dataset, 0, "log.json").read_text())
        assert [entry["epoch"] for entry in final_log] == list(range(epochs))
        assert final_log[: len(before_kill)] == before_kill
        assert {entry["attempt"] for entry in final_log} == {1}, "the orphan's run is the only one"
        assert not alive(trainer)
    finally:
        kill_and_reap(orphans)
