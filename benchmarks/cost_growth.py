"""How the cost of raw -> preprocessed 3d_fullres grows with the number of cases: nnsnake's workflow vs nnunetv2.

    python benchmarks/cost_growth.py [--cases 50 200 1000] [--nnunet-cases 50 200]
                                     [--work /tmp/nnsnake_cost_growth] [--cores 2] [--keep]

Run it on an idle machine (the load average is printed at the start and the end; above 1.5 the times are not
final numbers). The 1000-case nnsnake run takes several minutes on 2 cores; the datasets are generated once
(not timed) and reused by later runs.

Data: for every N in ``--cases`` (and ``--nnunet-cases``) a synthetic nnU-Net raw dataset of N training cases
made by ../shared/anchor/make_synthetic.py with its default shape (48x64x48 +-4 voxels, 1 mm, one channel,
labels organ + lesion), in ``<work>/raw/Dataset750_Cost<N>``; a dataset already there with N cases is reused.

nnsnake: the real workflow (``python -m snakemake --cores C --config dataset=<raw> configurations=["3d_fullres"]
-- results/<DS>/preprocessed/3d_fullres/manifest.json``, i.e. verify, fingerprint, plan, preprocess) in a fresh
copy of the workflow (Snakefile, workflow/, config/, profiles/, as benchmarks/workflow_overhead.py makes it) in
``<work>/nnsnake_<N>``, with ``snakemake -n`` timed before the run (from scratch) and after it (nothing to do).

nnunetv2 (the anchor venv, see ../shared/anchor), for every N in ``--nnunet-cases``: ``nnUNetv2_plan_and_preprocess
-d 750 -c 3d_fullres -np C -npfp C --verify_dataset_integrity`` with nnUNet_raw/_preprocessed/_results in a fresh
``<work>/nnunet_<N>`` (``-npfp C``: as many fingerprint processes as nnsnake's cores, not nnunetv2's default 8).
Both with OMP_NUM_THREADS=1; both times include interpreter start-up and imports, as a user waits for them.

Memory, per run: the kernel's ru_maxrss of the launched command (os.wait4: the largest single process of the
whole tree, exact, no sampling), and, sampled every 20 ms with psutil, the summed RSS of the whole tree, of each
workflow job (its script process plus its forked workers) and of the snakemake process itself. For nnsnake the
largest process may be snakemake itself (its DAG holds every raw file): the details table tells them apart.

Printed: a table per N with seconds per case and peak RSS of both tools, ``snakemake -n`` times, then nnsnake's
per-stage times (each job's process lifetime; in brackets the work its log accounts for) and memory, then
nnunetv2's memory. ``--keep`` keeps the run folders (workflow copies, nnU-Net folders); the datasets always stay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from common import SHARED, anchor_bin, dataset_id, link_raw, nnunet_env, print_table, without_stopped_slurm
from workflow_overhead import (
    logged_work,
    parse_snakemake_log,
    rule_scripts,
    snakemake_cmd,
    timed,
    workflow_copy,
)

DATASET_ID = 750
STAGES = ("verify", "fingerprint", "plan", "preprocess")
POLL_S = 0.02
LOAD_WARN = 1.5
MB = 2**20


@dataclass
class JobRun:
    """One workflow job's script process with its forked workers."""

    script: str
    start: float
    end: float = 0.0
    peak_mb: float = 0.0  # summed RSS of the job's process tree, sampled


@dataclass
class TreeRun:
    wall_s: float
    maxrss_mb: float  # largest single process of the tree (kernel, wait4)
    tree_peak_mb: float  # summed RSS of the whole tree, sampled
    root_peak_mb: float  # the launched process alone, sampled
    returncode: int
    output: str
    jobs: list[JobRun] = field(default_factory=list)


def run_tree(cmd: list[str], cwd: Path, env: dict[str, str]) -> TreeRun:
    """Run ``cmd``: wall time, the kernel's peak RSS of its largest process, sampled RSS of the tree, of the
    launched process and of each Snakemake script job (a process running ``.snakemake/scripts/tmp*.<name>.py``
    whose parent does not: its forked workers have the same command line and count as part of it)."""
    jobs: dict[tuple[int, float], JobRun] = {}
    script_of: dict[
        tuple[int, float], str
    ] = {}  # (pid, start) -> workflow script name, "" for other processes
    tree_peak = root_peak = 0
    with tempfile.TemporaryFile(mode="w+") as out:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.time()
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = [root]
            rss: dict[int, int] = {}
            parent: dict[int, int] = {}
            key_of: dict[int, tuple[int, float]] = {}
            for p in procs:
                try:
                    with p.oneshot():
                        rss[p.pid] = p.memory_info().rss
                        parent[p.pid] = p.ppid()
                        key = (p.pid, p.create_time())
                        if key not in script_of:
                            scripts = [a for a in p.cmdline()[1:] if "/.snakemake/scripts/" in a]
                            # Snakemake writes the script as tmp<random>.<name>.py
                            script_of[key] = Path(scripts[0]).name.split(".")[-2] if scripts else ""
                        key_of[p.pid] = key
                except psutil.Error:
                    continue
            tree_peak = max(tree_peak, sum(rss.values()))
            root_peak = max(root_peak, rss.get(root.pid, 0))
            job_sum: dict[tuple[int, float], int] = {}
            for p_pid, value in rss.items():
                # walk up to the outermost script process: that is the job
                job_key, q = None, p_pid
                while q in rss:
                    if script_of.get(key_of.get(q, (0, 0.0))):
                        job_key = key_of[q]
                    q = parent.get(q, 0)
                if job_key is not None:
                    job_sum[job_key] = job_sum.get(job_key, 0) + value
            for key, value in job_sum.items():
                if key not in jobs:
                    jobs[key] = JobRun(script_of[key], key[1])
                jobs[key].peak_mb = max(jobs[key].peak_mb, value / MB)
            for key, job in jobs.items():
                if not job.end and key not in job_sum:
                    job.end = now
            time.sleep(POLL_S)
        wall = time.time() - start
        for job in jobs.values():
            job.end = job.end or time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    return TreeRun(
        wall,
        usage.ru_maxrss * 1024 / MB,  # ru_maxrss is in KiB on Linux
        tree_peak / MB,
        root_peak / MB,
        proc.returncode,
        output,
        sorted(jobs.values(), key=lambda j: j.start),
    )


# --------------------------------------------------------------------------------------------------------------
# data


def dataset_dir(work: Path, n: int) -> Path:
    return work / "raw" / f"Dataset{DATASET_ID}_Cost{n}"


def case_count(ds: Path) -> int:
    if not (ds / "dataset.json").is_file():
        return -1
    images = len(list((ds / "imagesTr").glob("*_0000.nii.gz")))
    labels = len(list((ds / "labelsTr").glob("*.nii.gz")))
    return images if images == labels else -1


def ensure_dataset(work: Path, n: int) -> Path:
    """The synthetic dataset of ``n`` training cases (generated once; not timed)."""
    ds = dataset_dir(work, n)
    if case_count(ds) == n:
        return ds
    if ds.exists():
        shutil.rmtree(ds)
    generator = SHARED / "anchor" / "make_synthetic.py"
    if not generator.is_file():
        sys.exit(f"{generator} not found (set NNSNAKE_SHARED to the shared folder)")
    print(f"generating {n} cases into {ds} ...", flush=True)
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            str(generator),
            "--out",
            str(ds.parent),
            "--id",
            str(DATASET_ID),
            "--name",
            f"Cost{n}",
            "--n-train",
            str(n),
            "--n-test",
            "0",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    if case_count(ds) != n:
        sys.exit(f"{ds}: expected {n} cases after generation, found {case_count(ds)}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    return ds


# --------------------------------------------------------------------------------------------------------------
# runs


@dataclass
class NnsnakeResult:
    run: TreeRun
    dry_before_s: float
    dry_after_s: float
    stage_s: dict[str, float]  # job process lifetimes
    stage_work_s: dict[str, float]  # what the job logs account for
    stage_peak_mb: dict[str, float]


def run_nnsnake(ds: Path, work: Path, cores: int, env: dict[str, str], keep: bool) -> NnsnakeResult:
    target = f"results/{ds.name}/preprocessed/3d_fullres/manifest.json"
    root = work / f"nnsnake_{case_count(ds)}"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        wd = workflow_copy(root)
        dry_before = timed(snakemake_cmd(cores, ds, target, "-n"), wd, env)
        run = run_tree(snakemake_cmd(cores, ds, target), wd, env)
        if run.returncode:
            sys.exit(f"nnsnake failed on {ds.name}:\n{run.output[-5000:]}")
        if not (wd / target).is_file():
            sys.exit(f"nnsnake finished without {target}")
        dry_after = timed(snakemake_cmd(cores, ds, target, "-n"), wd, env)
        script_of = rule_scripts(wd)
        stage_work: dict[str, float] = {}
        snakemake_job_s: dict[str, float] = {}
        for log in sorted((wd / ".snakemake" / "log").glob("*.snakemake.log")):
            for job in parse_snakemake_log(log):
                if job.log and job.rule in STAGES:
                    stage_work[job.rule] = logged_work(wd / job.log)[0]
                    snakemake_job_s[job.rule] = job.end - job.start
        stage_s: dict[str, float] = {}
        stage_peak: dict[str, float] = {}
        scripts = {script_of.get(stage, stage): stage for stage in STAGES}
        for job in run.jobs:
            stage = scripts.get(job.script, job.script)
            stage_s[stage] = stage_s.get(stage, 0.0) + (job.end - job.start)
            stage_peak[stage] = max(stage_peak.get(stage, 0.0), job.peak_mb)
        # the light rules (run_step) run inside the snakemake process: their time is Snakemake's job time (whole
        # seconds); the fingerprint step's memory is measured by running it again alone in a fresh interpreter
        for stage in STAGES:
            if stage not in stage_s and stage in snakemake_job_s:
                stage_s[stage] = snakemake_job_s[stage]
        if "fingerprint" not in stage_peak:
            results = wd / "results" / ds.name
            alone = run_tree(
                [
                    sys.executable,
                    "-c",
                    "import sys; from nnsnake import steps; "
                    "steps.fingerprint(sys.argv[1], sys.argv[2], case_fingerprints=sys.argv[3])",
                    str(ds),
                    str(root / "fingerprint_alone.json"),
                    str(results / "case_fingerprints.npz"),
                ],
                wd,
                env,
            )
            if alone.returncode:
                sys.exit(f"the fingerprint step alone failed:\n{alone.output[-3000:]}")
            stage_peak["fingerprint"] = alone.maxrss_mb
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return NnsnakeResult(run, dry_before, dry_after, stage_s, stage_work, stage_peak)


def run_nnunet(ds: Path, work: Path, cores: int, keep: bool) -> TreeRun:
    root = work / f"nnunet_{case_count(ds)}"
    if root.exists():
        shutil.rmtree(root)
    try:
        env = nnunet_env(root)
        link_raw(root, ds)
        cmd = [
            anchor_bin("nnUNetv2_plan_and_preprocess"),
            "-d",
            dataset_id(ds),
            "-c",
            "3d_fullres",
            "-np",
            str(cores),
            "-npfp",
            str(cores),
            "--verify_dataset_integrity",
        ]
        run = run_tree(cmd, root, env)
        if run.returncode:
            sys.exit(f"nnunetv2 failed on {ds.name}:\n{run.output[-5000:]}")
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return run


# --------------------------------------------------------------------------------------------------------------


def load_line(when: str) -> str:
    load = os.getloadavg()
    line = f"load average at {when}: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    if load[0] > LOAD_WARN:
        line += f"\nNOTE: load > {LOAD_WARN}: the times are measured UNDER LOAD, not final numbers"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, nargs="+", default=[50, 200, 1000], help="N for nnsnake")
    parser.add_argument("--nnunet-cases", type=int, nargs="*", default=[50, 200], help="N for nnunetv2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnsnake_cost_growth"))
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores; nnunetv2 -np and -npfp")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (the datasets always stay)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    slurm_note = without_stopped_slurm(env)
    if slurm_note:
        print(slurm_note)
    start_line = load_line("start")
    print(
        f"cost growth, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, "
        f"--cores {args.cores}\n{start_line}",
        flush=True,
    )
    sizes = sorted(set(args.cases) | set(args.nnunet_cases))
    datasets = {n: ensure_dataset(work, n) for n in sizes}

    ours: dict[int, NnsnakeResult] = {}
    theirs: dict[int, TreeRun] = {}
    for n in sizes:
        if n in args.cases:
            print(f"nnsnake, {n} cases ...", flush=True)
            ours[n] = run_nnsnake(datasets[n], work, args.cores, env, args.keep)
            print(f"  {ours[n].run.wall_s:.1f} s", flush=True)
        if n in args.nnunet_cases:
            print(f"nnunetv2, {n} cases ...", flush=True)
            theirs[n] = run_nnunet(datasets[n], work, args.cores, args.keep)
            print(f"  {theirs[n].wall_s:.1f} s", flush=True)

    print("\n== raw -> preprocessed 3d_fullres: seconds per case and peak RSS (largest single process) ==")
    rows = [
        (
            "N",
            "nnsnake s/case",
            "nnsnake peak RSS MB",
            "nnunetv2 s/case",
            "nnunetv2 peak RSS MB",
            "snakemake -n s before",
            "snakemake -n s after",
        )
    ]
    for n in sizes:
        o, t = ours.get(n), theirs.get(n)
        rows.append(
            (
                str(n),
                f"{o.run.wall_s / n:.3f}" if o else "-",
                f"{o.run.maxrss_mb:.0f}" if o else "-",
                f"{t.wall_s / n:.3f}" if t else "-",
                f"{t.maxrss_mb:.0f}" if t else "-",
                f"{o.dry_before_s:.2f}" if o else "-",
                f"{o.dry_after_s:.2f}" if o else "-",
            )
        )
    print_table(rows)

    if ours:
        print(
            "\n== nnsnake per stage: job process lifetime s (work its log accounts for), peak RSS MB of the job "
            "(its process + workers, summed) ==\n"
            "(fingerprint and plan run inside the snakemake process: their s is Snakemake's job time in whole "
            "seconds; fingerprint MB is the step run again alone, in a fresh interpreter)"
        )
        rows = [
            (
                "N",
                "total s",
                *STAGES,
                "outside jobs s",
                *[f"{s} MB" for s in STAGES],
                "snakemake proc MB",
                "whole tree MB",
            )
        ]
        for n, o in ours.items():
            in_jobs = sum(o.stage_s.values())
            rows.append(
                (
                    str(n),
                    f"{o.run.wall_s:.1f}",
                    *[
                        f"{o.stage_s[s]:.1f} ({o.stage_work_s.get(s, 0.0):.1f})" if s in o.stage_s else "?"
                        for s in STAGES
                    ],
                    f"{o.run.wall_s - in_jobs:.1f}",
                    *[f"{o.stage_peak_mb[s]:.0f}" if s in o.stage_peak_mb else "?" for s in STAGES],
                    f"{o.run.root_peak_mb:.0f}",
                    f"{o.run.tree_peak_mb:.0f}",
                )
            )
        print_table(rows)
        others = sorted({j.script for o in ours.values() for j in o.run.jobs} - set(STAGES))
        if others:
            print(f"(other script jobs seen: {', '.join(others)})")

    if theirs:
        print("\n== nnunetv2 ==")
        rows = [("N", "total s", "s/case", "largest process MB", "launched process MB", "whole tree MB")]
        for n, t in theirs.items():
            rows.append(
                (
                    str(n),
                    f"{t.wall_s:.1f}",
                    f"{t.wall_s / n:.3f}",
                    f"{t.maxrss_mb:.0f}",
                    f"{t.root_peak_mb:.0f}",
                    f"{t.tree_peak_mb:.0f}",
                )
            )
        print_table(rows)

    print(f"\n{start_line}\n{load_line('end')}")


if __name__ == "__main__":
    main()
