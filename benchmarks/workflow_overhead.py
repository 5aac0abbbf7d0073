"""Where the user's time goes in the workflow: each job's wall time against the work its own log accounts for.

    python benchmarks/workflow_overhead.py [--full] [--hippocampus] [--cores 2] [--imports-only]
                                           [--pythonpath DIR]

Runs the real workflow (a private copy of Snakefile, workflow/, config/ and profiles/ in a temporary folder, as
tests/test_workflow.py does) on the embedded demo (examples/Dataset104_HippocampusDemo), from an empty results
folder, up to the plan (``-- results/<DS>/plans.json``) and up to preprocessed 3d_fullres; ``--full`` adds the
demo's whole pipeline (the README main command), ``--hippocampus`` adds ../shared/data/Dataset004_Hippocampus up
to the plan and up to preprocessed 3d_fullres.

For every job it prints:

* ``job``: Snakemake's own start/finish timestamps of the job (.snakemake/log/*.snakemake.log, 1 s resolution);
* ``proc``: the lifetime of the job's Python process (psutil, polled every 20 ms), and ``proc cpu`` its CPU
  time (user + system, its worker processes included: steadier than wall times on a loaded machine);
* ``work``: what the job's log file accounts for: the largest "in N s" or "(N s)" duration it logs, or the span between its
  first and last log lines if that is longer;
* ``proc-work``: interpreter start-up, imports and writing, the cost of running the step in its own process;
  ``job-proc``: what Snakemake adds around the process (coarse: its timestamps have whole seconds).

Per run: total wall time, time until the first job's process starts (Snakemake start-up, DAG building,
scheduling), the time no job process ran (all of Snakemake's own overhead, checkpoint re-evaluation included),
the gaps over 0.3 s between jobs (the one after the plan checkpoint is its re-evaluation), and the time of
``snakemake -n`` before the run and after it (nothing to do) plus ``python -m snakemake --version`` (start-up).

The light rules' imports are measured first, on the demo in a fresh interpreter each: verify runs as its
workflow script (``workflow/scripts/verify.py``, with a stand-in for Snakemake's ``snakemake`` object);
fingerprint, plan, splits and derive_plans run their step under ``steps.job_log`` as ``run_step`` does inside
Snakemake's own process; crossval_table and postprocessing_table (which need a trained model) import what their
step function imports. Rules run by ``run_step`` have no process of their own in the workflow runs: the tables
show Snakemake's job times for them. Printed: import time of ``nnsnake.steps``, the step's whole time (wall, CPU), which
heavy modules (torch, matplotlib, scipy, SimpleITK, pandas, nibabel) got loaded.

``--repo DIR`` runs another checkout's workflow files and library (``git worktree add /tmp/before <rev>``), the
fair "before" when rules changed too. ``--pythonpath DIR`` puts DIR first on PYTHONPATH for every process (the jobs too): point it at the ``src`` of an
older checkout (``git archive <rev> src | tar -x -C /tmp/old``) to compare before/after in the same session.
Absolute times depend on the machine's load; compare rows of one session only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import without_stopped_slurm  # noqa: E402

SHARED = Path(os.environ.get("NNSNAKE_SHARED", REPO.parent / "shared"))
DEMO = REPO / "examples" / "Dataset104_HippocampusDemo"
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles")
HEAVY = ("torch", "matplotlib", "scipy", "SimpleITK", "pandas", "nibabel")
POLL_S = 0.02

# Runs one workflow script as Snakemake would (its `snakemake` global is a stand-in with the rule's fields).
SCRIPT_RUNNER = r"""
import json, runpy, sys, time
t0 = time.perf_counter()
from nnsnake import steps
t_import = time.perf_counter() - t0

class Fields(list):
    def __init__(self, items=(), **named):
        super().__init__([*items, *named.values()])
        self.__dict__.update(named)

class Snakemake:
    def __init__(self, spec):
        self.input = Fields(**spec.get("input", {}))
        output = spec.get("output", [])
        self.output = Fields(**output) if isinstance(output, dict) else Fields(output)
        self.params = Fields(**spec.get("params", {}))
        self.log = Fields(spec.get("log", []))
        self.threads = spec.get("threads", 1)

spec = json.loads(sys.argv[2])
steps.finish_job_process = lambda: None  # the scripts end their process early; here the report follows
if spec.get("script"):
    runpy.run_path(sys.argv[1], init_globals={"snakemake": Snakemake(spec)})
elif spec.get("step"):  # a light rule: run_step runs the step inside Snakemake's own process
    with steps.job_log(spec["log"][0]):
        getattr(steps, spec["step"])(*spec["args"], **spec.get("kwargs", {}))
else:  # import only what the step function imports
    import importlib
    for module in spec["modules"]:
        importlib.import_module(module)
total = time.perf_counter() - t0
print(json.dumps({"import_steps": t_import, "total": total,
                  "heavy": [m for m in HEAVY if m in sys.modules], "n_modules": len(sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


# --------------------------------------------------------------------------------------------------------------
# light scripts' imports


def script_specs(work: Path) -> list[tuple[str, dict]]:
    """The light scripts with the inputs their rule gives them, on the demo, in dependency order."""
    demo = str(DEMO)
    out = str(work)
    return [
        (
            "verify",
            {
                "script": True,
                "params": {"dataset": demo},
                "output": {
                    "report": f"{out}/verification.json",
                    "case_fingerprints": f"{out}/case_fingerprints.npz",
                },
            },
        ),
        (
            "fingerprint",
            {
                "step": "fingerprint",
                "args": [demo, f"{out}/fingerprint.json"],
                "kwargs": {"case_fingerprints": f"{out}/case_fingerprints.npz"},
            },
        ),
        (
            "plan",
            {
                "step": "plan",
                "args": [f"{out}/fingerprint.json", demo, f"{out}/plans.json"],
                "kwargs": {"gpu_memory_target_gb": 8.0, "planner": "ExperimentPlanner"},
            },
        ),
        ("splits", {"step": "splits", "args": [f"{out}/verification.json", f"{out}/splits.json", None]}),
        (
            "derive_plans",
            {
                "step": "derive_plans",
                "args": [
                    f"{out}/plans.json",
                    {"3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}},
                    f"{out}/derived/3d_fullres_bs4/plans.json",
                ],
            },
        ),
        ("crossval_table", {"modules": step_function_modules("crossval_table")}),
        ("postprocessing_table", {"modules": step_function_modules("postprocessing_table")}),
    ]


def step_function_modules(name: str) -> list[str]:
    """The nnsnake modules a step function imports in its body (``from ..x import``)."""
    import inspect

    from nnsnake import steps

    source = inspect.getsource(getattr(steps, name))
    return sorted({f"nnsnake.{m}" for m in re.findall(r"from \.\.(\w+(?:\.\w+)*) import", source)})


def measure_imports(env: dict[str, str]) -> None:
    import json

    print("\n== light scripts: imports and whole step (fresh interpreter each, demo data) ==")
    rows = [("script", "how", "import steps s", "total s", "cpu s", "heavy modules loaded", "modules")]
    with tempfile.TemporaryDirectory(prefix="nnsnake-imports-") as tmp:
        work = Path(tmp)
        for name, spec in script_specs(work):
            spec.setdefault("log", [f"{work}/logs/{name}.log"])
            script = REPO / "workflow" / "scripts" / f"{name}.py"
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run(
                [sys.executable, "-c", SCRIPT_RUNNER, str(script), json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
                cwd=work,
            )
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            if proc.returncode != 0:
                rows.append((name, "FAILED", "", "", "", proc.stderr.strip().splitlines()[-1][:80], ""))
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(
                (
                    name,
                    "runs script" if spec.get("script") else "runs step" if spec.get("step") else "imports",
                    f"{result['import_steps']:.2f}",
                    f"{result['total']:.2f}",
                    f"{cpu:.2f}",
                    ",".join(result["heavy"]) or "-",
                    str(result["n_modules"]),
                )
            )
    print_table(rows)


# --------------------------------------------------------------------------------------------------------------
# workflow runs


@dataclass
class Process:
    script: str
    start: float
    end: float = 0.0
    cpu: float = 0.0  # user + system seconds (its reaped worker processes included), last sample


@dataclass
class Job:
    jobid: str
    rule: str
    wildcards: str = ""
    log: str = ""
    start: float = 0.0
    end: float = 0.0
    process: Process | None = None
    work: float = 0.0
    first_log: float | None = None
    extra: dict = field(default_factory=dict)


WORKFLOW_SOURCE = [REPO]  # --repo: another checkout's workflow (and its src first on PYTHONPATH)


def workflow_copy(root: Path) -> Path:
    wd = root / "wf"
    wd.mkdir()
    for name in WORKFLOW_FILES:
        src = WORKFLOW_SOURCE[0] / name
        if src.is_dir():
            shutil.copytree(src, wd / name)
        else:
            shutil.copy(src, wd / name)
    return wd


def run_monitored(
    cmd: list[str], cwd: Path, env: dict[str, str]
) -> tuple[float, float, float, list[Process]]:
    """Run ``cmd``; its start time, wall time, its own CPU time (children not included) and the workflow scripts'
    Python processes (lifetimes, CPU times)."""
    seen: dict[int, Process] = {}
    own_cpu = 0.0
    os.sync()  # no run pays for writing back the files of the one before (preprocessing syncs its output)
    with tempfile.TemporaryFile(mode="w+") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            now = time.time()
            alive = set()
            try:
                t = root.cpu_times()
                own_cpu = t.user + t.system
            except psutil.Error:
                pass
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                alive.add(child.pid)
                if child.pid in seen:
                    try:
                        t = child.cpu_times()
                        seen[child.pid].cpu = t.user + t.system + t.children_user + t.children_system
                    except psutil.Error:
                        pass
                    continue
                try:
                    cmdline = child.cmdline()
                    created = child.create_time()
                except psutil.Error:
                    continue
                scripts = [a for a in cmdline[1:] if "/.snakemake/scripts/" in a]
                if cmdline and Path(cmdline[0]).name.startswith("python") and scripts:
                    # Snakemake writes the script as tmp<random>.<name>.py
                    seen[child.pid] = Process(Path(scripts[0]).name.split(".")[-2], created)
            for pid, p in seen.items():
                if not p.end and pid not in alive:
                    p.end = now
            time.sleep(POLL_S)
        wall = time.time() - start
        for p in seen.values():
            if not p.end:
                p.end = time.time()
        if proc.returncode != 0:
            out.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{out.read()[-5000:]}")
    return start, wall, own_cpu, sorted(seen.values(), key=lambda p: p.start)


STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")


def parse_snakemake_log(path: Path) -> list[Job]:
    """Jobs with their start/finish from Snakemake's log (timestamps as epoch seconds, whole seconds)."""
    jobs: dict[str, Job] = {}
    stamp = 0.0
    pending: Job | None = None
    for line in path.read_text().splitlines():
        if m := STAMP.match(line.strip()):
            stamp = dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y").timestamp()
            continue
        if m := re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", line.strip()):
            pending = Job("", m.group(1), start=stamp)
            continue
        if pending is not None:
            if m := re.match(r"^\s+jobid: (\d+)", line):
                pending.jobid = m.group(1)
                jobs[pending.jobid] = pending
            elif m := re.match(r"^\s+wildcards: (.*)", line):
                pending.wildcards = m.group(1)
            elif m := re.match(r"^\s+log: (\S+)", line):
                pending.log = m.group(1).rstrip(",")
            elif not line.strip():
                pending = None
        if m := re.match(r"^Finished jobid: (\d+)|^Finished job (\d+)\.", line.strip()):
            job = jobs.get(m.group(1) or m.group(2))
            if job is not None:
                job.end = stamp
    return list(jobs.values())


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
DURATION = re.compile(r"(?:\bin |\()(\d+(?:\.\d+)?) ?s\b")  # "... in 5.6 s" or "... (5.6 s)"


def logged_work(log_file: Path) -> tuple[float, float | None]:
    """The work a job's log accounts for, and the time of its first log line."""
    if not log_file.is_file():
        return 0.0, None
    stamps, durations = [], [0.0]
    for line in log_file.read_text(errors="replace").splitlines():
        if m := LOG_LINE.match(line):
            stamps.append(dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
            durations += [float(d) for d in DURATION.findall(line)]
    span = stamps[-1] - stamps[0] if stamps else 0.0
    return max(max(durations), span), (stamps[0] if stamps else None)


def rule_scripts(wd: Path) -> dict[str, set[str]]:
    """rule name -> the script names (without .py) it may run, read from the .smk files (a rule defined in both
    branches of an ``if``, as preprocess is, has one script per branch)."""
    mapping: dict[str, set[str]] = {}
    for smk in [wd / "Snakefile", *sorted((wd / "workflow" / "rules").glob("*.smk"))]:
        rule = None
        for line in smk.read_text().splitlines():
            if m := re.match(r"^\s*(?:rule|checkpoint) (\w+):", line):
                rule = m.group(1)
            elif rule and (m := re.match(r'^\s+"[^"]*scripts/(\w+)\.py"', line)):
                mapping.setdefault(rule, set()).add(m.group(1))
    return mapping


def attach_processes(
    jobs: list[Job], processes: list[Process], scripts: dict[str, set[str]], wd: Path
) -> None:
    """Give each job its process: same script, running when the job's log got its first line (else nearest)."""
    free = list(processes)
    for job in sorted(jobs, key=lambda j: j.start):
        job.work, job.first_log = logged_work(wd / job.log) if job.log else (0.0, None)
        candidates = [p for p in free if p.script in scripts.get(job.rule, set())]
        if not candidates:
            continue
        if job.first_log is not None:
            inside = [p for p in candidates if p.start <= job.first_log <= p.end + 0.1]
            candidates = inside or candidates
        best = min(candidates, key=lambda p: abs(p.start - job.start))
        job.process = best
        free.remove(best)


def idle_and_gaps(
    start: float, wall: float, processes: list[Process]
) -> tuple[float, list[tuple[float, float]]]:
    """Time in which no job process ran, and the gaps (from, length) between them, first and last included."""
    gaps, covered_until, idle = [], start, 0.0
    for p in sorted(processes, key=lambda p: p.start):
        if p.start > covered_until:
            gaps.append((covered_until, p.start - covered_until))
            idle += p.start - covered_until
        covered_until = max(covered_until, p.end)
    end = start + wall
    if end > covered_until:
        gaps.append((covered_until, end - covered_until))
        idle += end - covered_until
    return idle, gaps


def snakemake_cmd(cores: int, dataset: Path, target: str, *extra: str) -> list[str]:
    """The command for ``target`` (``all``: the README main command, every configuration)."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), *extra, "--config", f"dataset={dataset}"]
    if target != "all":
        cmd += ['configurations=["3d_fullres"]', "--", target]
    return cmd


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def run_case(dataset: Path, stage: str, cores: int, env: dict[str, str]) -> None:
    targets = {
        "plan": f"results/{dataset.name}/plans.json",
        "preprocess": f"results/{dataset.name}/preprocessed/3d_fullres/manifest.json",
        "full": "all",
    }
    target = targets[stage]
    with tempfile.TemporaryDirectory(prefix="nnsnake-overhead-") as tmp:
        wd = workflow_copy(Path(tmp))
        dry_before = timed(snakemake_cmd(cores, dataset, target, "-n"), wd, env)
        start, wall, own_cpu, processes = run_monitored(snakemake_cmd(cores, dataset, target), wd, env)
        logs = sorted((wd / ".snakemake" / "log").glob("*.snakemake.log"))
        jobs = parse_snakemake_log(logs[-1]) if logs else []
        dry_after = timed(snakemake_cmd(cores, dataset, target, "-n"), wd, env)
        attach_processes(jobs, processes, rule_scripts(wd), wd)

    print(f"\n== {dataset.name} up to {stage} ({target}), --cores {cores} ==")
    rows = [
        ("rule", "wildcards", "job s", "proc s", "proc cpu s", "work s", "proc-work s", "job-proc s", "start")
    ]
    for job in sorted(jobs, key=lambda j: j.process.start if j.process else j.start):
        p = job.process
        proc_s = p.end - p.start if p else 0.0
        rows.append(
            (
                job.rule,
                job.wildcards[:40] or "-",
                f"{job.end - job.start:.0f}" if job.end else "?",
                f"{proc_s:.2f}" if p else "-",
                f"{p.cpu:.2f}" if p else "-",
                f"{job.work:.2f}" if p else "-",
                f"{proc_s - job.work:.2f}" if p else "-",
                f"{(job.end - job.start) - proc_s:+.1f}" if p and job.end else "-",
                f"{(p.start if p else job.start) - start:6.2f}",
            )
        )
    print_table(rows)
    matched = [j for j in jobs if j.process]
    work = sum(j.work for j in matched)
    in_process = sum((j.process.end - j.process.start) - j.work for j in matched if j.process)
    idle, gaps = idle_and_gaps(start, wall, processes)
    first = processes[0].start - start if processes else float("nan")
    print(
        f"total wall {wall:.2f} s; logged work {work:.2f} s (summed over jobs); in-process overhead "
        f"{in_process:.2f} s (summed); no job process running {idle:.2f} s; first job process after {first:.2f} s; "
        f"CPU time of the snakemake process itself {own_cpu:.2f} s"
    )
    by_start = sorted(processes, key=lambda p: p.start)
    for at, length in gaps:
        if length > 0.3:
            before = [p.script for p in by_start if p.end <= at + 1e-3]
            after = [p.script for p in by_start if p.start >= at + length - 1e-3]
            print(
                f"  gap {length:5.2f} s at {at - start:6.2f} s: after {before[-1] if before else 'start'}, "
                f"before {after[0] if after else 'exit'}"
            )
    print(f"snakemake -n: {dry_before:.2f} s before the run, {dry_after:.2f} s after it (nothing to do)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="also the demo's whole pipeline (minutes)")
    parser.add_argument(
        "--hippocampus", action="store_true", help="also Dataset004_Hippocampus (plan, preprocess)"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--imports-only", action="store_true", help="only the light scripts' imports")
    parser.add_argument("--no-imports", action="store_true", help="skip the light scripts' imports")
    parser.add_argument("--pythonpath", help="put this folder first on PYTHONPATH (an older checkout's src)")
    parser.add_argument(
        "--repo",
        type=Path,
        help="run another checkout's workflow and library (e.g. `git worktree add /tmp/before <rev>`): before/after",
    )
    args = parser.parse_args()
    if args.repo:
        WORKFLOW_SOURCE[0] = args.repo.resolve()
        args.pythonpath = str(args.repo.resolve() / "src")

    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    slurm_note = without_stopped_slurm(env)
    load = os.getloadavg()
    print(
        f"workflow overhead, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} / {load[1]:.1f}"
    )
    if load[0] > (os.cpu_count() or 1):
        print(
            "NOTE: the machine is loaded: the absolute times below are measured UNDER LOAD, not final numbers"
        )
    if args.pythonpath:
        print(f"PYTHONPATH first: {args.pythonpath}")
    if slurm_note:
        print(slurm_note)

    if not args.no_imports:
        measure_imports(env)
    if args.imports_only:
        return
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--version"], env=env, capture_output=True, check=True)
    print(f"\npython -m snakemake --version (start-up): {time.perf_counter() - start:.2f} s")
    cases = [(DEMO, "plan"), (DEMO, "preprocess")]
    if args.full:
        cases.append((DEMO, "full"))
    if args.hippocampus:
        hippocampus = SHARED / "data" / "Dataset004_Hippocampus"
        cases += [(hippocampus, "plan"), (hippocampus, "preprocess")]
    for dataset, stage in cases:
        run_case(dataset, stage, args.cores, env)


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
