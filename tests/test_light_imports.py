"""Light rules stay light: verify, fingerprint, plan, splits and derive_plans load no torch and no matplotlib
(torch alone costs a job seconds of start-up, more than the work of most of these rules).

The verify script runs as the workflow runs it, in a fresh interpreter with a stand-in for Snakemake's
``snakemake`` object; the steps of the rules that run inside Snakemake's own process (run_step) run as it runs
them, under ``steps.job_log``. Both on the embedded demo; the subprocess then reports which heavy modules got
imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "Dataset104_HippocampusDemo"
SCRIPTS = REPO / "workflow" / "scripts"

RUNNER = r"""
import json, runpy, sys

class Fields(list):
    def __init__(self, items=(), **named):
        super().__init__([*items, *named.values()])
        self.__dict__.update(named)

class Snakemake:
    def __init__(self, spec):
        self.input = Fields(**spec.get("input", {}))
        output = spec["output"]
        self.output = Fields(**output) if isinstance(output, dict) else Fields(output)
        self.params = Fields(**spec.get("params", {}))
        self.log = Fields(spec["log"])
        self.threads = 1

from nnsnake import steps
steps.finish_job_process = lambda: None  # the scripts end their process; here more code follows
for script, spec in json.loads(sys.argv[1]):
    runpy.run_path(script, init_globals={"snakemake": Snakemake(spec)})
heavy = ("torch", "matplotlib", "SimpleITK", "scipy", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def run_scripts(runs: list[tuple[str, dict]], cwd: Path) -> list[str]:
    """Run the workflow scripts one after the other in one fresh interpreter; the heavy modules it loaded."""
    plan = [(str(SCRIPTS / f"{name}.py"), spec | {"log": [str(cwd / f"{name}.log")]}) for name, spec in runs]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(plan)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


STEP_RUNNER = r"""
import json, sys
from nnsnake import steps

for name, args, kwargs, log in json.loads(sys.argv[1]):
    with steps.job_log(log):
        getattr(steps, name)(*args, **kwargs)
heavy = ("torch", "matplotlib", "SimpleITK", "scipy", "pandas")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def run_steps(runs: list[tuple[str, list, dict]], cwd: Path) -> list[str]:
    """Run the steps one after the other as run_step does (in one fresh interpreter); the heavy modules loaded."""
    plan = [(name, args, kwargs, str(cwd / f"{name}.log")) for name, args, kwargs in runs]
    result = subprocess.run(
        [sys.executable, "-c", STEP_RUNNER, json.dumps(plan)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_light_steps_import_no_torch(tmp_path: Path) -> None:
    demo = str(DEMO)
    verification, fingerprint = tmp_path / "verification.json", tmp_path / "fingerprint.json"
    plans = tmp_path / "plans.json"

    case_fingerprints = tmp_path / "case_fingerprints.npz"

    # the job that reads the images (verify, which fingerprints each case too): SimpleITK and scipy are its
    # tools, torch and matplotlib are not
    loaded = run_scripts(
        [
            (
                "verify",
                {
                    "params": {"dataset": demo},
                    "output": {"report": str(verification), "case_fingerprints": str(case_fingerprints)},
                },
            )
        ],
        tmp_path,
    )
    assert "torch" not in loaded and "matplotlib" not in loaded, loaded
    assert json.loads(verification.read_text())["case_ids"]  # the script really ran
    assert case_fingerprints.is_file()

    # the light rules run their steps inside Snakemake's own process (run_step): the fingerprint job only
    # aggregates the cases' fingerprints, the others read and write JSON; none loads an image library
    loaded = run_steps(
        [
            ("fingerprint", [demo, str(fingerprint)], {"case_fingerprints": str(case_fingerprints)}),
            (
                "plan",
                [str(fingerprint), demo, str(plans)],
                {"gpu_memory_target_gb": 8.0, "planner": "ExperimentPlanner"},
            ),
            ("splits", [str(verification), str(tmp_path / "splits.json"), None], {}),
            (
                "derive_plans",
                [
                    str(plans),
                    {"3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}},
                    str(tmp_path / "derived.json"),
                ],
                {},
            ),
        ],
        tmp_path,
    )
    assert loaded == [], f"fingerprint/plan/splits/derive_plans loaded {loaded}"
    assert fingerprint.is_file()
    assert "3d_fullres" in json.loads(plans.read_text())["configurations"]
    assert len(json.loads((tmp_path / "splits.json").read_text())) == 5
    assert "fingerprint of 24 cases" in (tmp_path / "fingerprint.log").read_text()


def test_job_log_takes_its_threads_records_and_the_error(tmp_path: Path) -> None:
    """A step run inside a shared process logs to its rule's log file: its own thread's records and the error
    that ends it, not another thread's records."""
    import threading

    import pytest

    from nnsnake import steps

    other_started, first_done = threading.Event(), threading.Event()

    def other_job() -> None:
        with steps.job_log(tmp_path / "other.log"):
            other_started.set()
            first_done.wait(10)
            steps.log.info("other job's line")

    thread = threading.Thread(target=other_job)
    thread.start()
    other_started.wait(10)
    with pytest.raises(ValueError, match="broken input"), steps.job_log(tmp_path / "job.log"):
        steps.log.info("job's line")
        raise ValueError("broken input")
    first_done.set()
    thread.join(10)
    job_log, other_log = (tmp_path / "job.log").read_text(), (tmp_path / "other.log").read_text()
    assert "job's line" in job_log and "ValueError: broken input" in job_log and "other" not in job_log
    assert "other job's line" in other_log and "job's line" not in other_log.replace("other job's line", "")
    assert not steps.log.handlers  # nothing left behind in the shared process


COSTS_RUNNER = r"""
import json, sys
from nnsnake.steps.select import _candidate_costs

plans_paths, dataset_json = json.loads(sys.argv[1])
costs = _candidate_costs(["2d", "nnUNetResEncUNetMPlans__3d_fullres"], plans_paths, dataset_json)
print(json.dumps([costs, sorted(m for m in ("torch", "matplotlib") if m in sys.modules)]))
"""


def test_selection_costs_load_no_torch() -> None:
    """The select job counts its candidates' network parameters from the plans (architecture.parameter_count):
    importing torch for that cost the job about 2 s of its 6."""
    fixtures = REPO / "tests" / "fixtures" / "nnunetv2" / "Dataset004_Hippocampus"
    plans = {name: str(fixtures / f"{name}.json") for name in ("nnUNetPlans", "nnUNetResEncUNetMPlans")}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2}}
    result = subprocess.run(
        [sys.executable, "-c", COSTS_RUNNER, json.dumps([plans, dataset_json])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    costs, heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert costs["nnUNetResEncUNetMPlans__3d_fullres"] == 25_895_593 and 0 < costs["2d"] < 25_895_593


FINISH_RUNNER = r"""
import multiprocessing, sys, time
from pathlib import Path
from nnsnake import steps

def slow_child(path):
    time.sleep(0.5)
    Path(path).write_text("child done")

if __name__ == "__main__":
    folder = Path(sys.argv[1])
    steps.setup_logging(folder / "job.log")
    steps.log.info("the step's last line")
    multiprocessing.get_context("fork").Process(target=slow_child, args=(str(folder / "child.txt"),)).start()
    print("buffered output", end="")
    steps.finish_job_process()
    Path(folder / "after.txt").write_text("never")
"""


def test_finish_job_process_flushes_waits_for_children_and_exits_zero(tmp_path: Path) -> None:
    """The early exit of a job script loses nothing: the log and stdout are flushed, a child still running is
    waited for, the status is 0, and nothing after the call runs."""
    result = subprocess.run(
        [sys.executable, "-c", FINISH_RUNNER, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "buffered output"
    assert "the step's last line" in (tmp_path / "job.log").read_text()
    assert (tmp_path / "child.txt").read_text() == "child done"
    assert not (tmp_path / "after.txt").exists()
