"""Light rules stay light: the verify, fingerprint, plan, splits and derive_plans scripts load no torch and no
matplotlib (torch alone costs a job seconds of start-up, more than the work of most of these rules).

Each script runs as the workflow runs it, in a fresh interpreter with a stand-in for Snakemake's ``snakemake``
object, on the embedded demo; the subprocess then reports which heavy modules got imported.
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


def test_light_scripts_import_no_torch(tmp_path: Path) -> None:
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

    # the fingerprint job only aggregates the cases' fingerprints: no image library
    loaded = run_scripts(
        [
            (
                "fingerprint",
                {
                    "input": {"verification": str(verification), "case_fingerprints": str(case_fingerprints)},
                    "params": {"dataset": demo},
                    "output": [str(fingerprint)],
                },
            )
        ],
        tmp_path,
    )
    assert loaded == [], f"fingerprint loaded {loaded}"
    assert fingerprint.is_file()

    # the jobs that only read and write JSON load no image library either
    loaded = run_scripts(
        [
            (
                "plan",
                {
                    "input": {"fingerprint": str(fingerprint), "dataset_json": f"{demo}/dataset.json"},
                    "params": {
                        "dataset": demo,
                        "gpu_memory_target_gb": 8.0,
                        "overwrite_target_spacing": None,
                        "planner": "ExperimentPlanner",
                        "extra_configurations": {},
                        "transfer_plans_from": None,
                    },
                    "output": [str(plans)],
                },
            ),
            (
                "splits",
                {
                    "input": {"verification": str(verification), "user_splits": []},
                    "output": [str(tmp_path / "splits.json")],
                },
            ),
            (
                "derive_plans",
                {
                    "input": {"plans": str(plans)},
                    "params": {
                        "entries": {"3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}}
                    },
                    "output": [str(tmp_path / "derived.json")],
                },
            ),
        ],
        tmp_path,
    )
    assert loaded == [], f"plan/splits/derive_plans loaded {loaded}"
    assert "3d_fullres" in json.loads(plans.read_text())["configurations"]
    assert len(json.loads((tmp_path / "splits.json").read_text())) == 5
