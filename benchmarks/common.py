"""Shared helpers for the side-by-side benchmarks (nnsnake vs the official nnunetv2, run by hand).

``measure(cmd)`` runs a command and returns its wall time and the peak of the summed resident memory of the
whole process tree (worker pools included), sampled every 20 ms with psutil.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNSNAKE_SHARED", REPO.parent / "shared"))
ANCHOR_VENV = Path(os.environ.get("VENV", "/tmp/venv-nnunet"))


def without_stopped_slurm(env: dict[str, str]) -> str | None:
    """Point SLURM's commands at an empty config when this machine has SLURM configured but not running.

    Every snakemake start imports the SLURM executor plugin, which runs ``scontrol show config``; after
    tests/slurm/slurm_local.sh has set a cluster up and stopped it again, that call retries for about 9 s, which
    no user without SLURM (no ``scontrol``) or with a running cluster (an instant answer) ever waits. Returns a
    line for the benchmark's header when it applied, else None (tests/conftest.py does the same for the tests).
    """
    if "SLURM_CONF" in env or shutil.which("scontrol") is None:
        return None
    try:
        running = (
            subprocess.run(["scontrol", "ping"], env=env, capture_output=True, timeout=5).returncode == 0
        )
    except subprocess.TimeoutExpired:
        running = False
    if not running:
        empty = Path(tempfile.mkdtemp(prefix="no_slurm_")) / "slurm.conf"
        empty.touch()
        env["SLURM_CONF"] = str(empty)
        return "SLURM is configured here but not running: its commands get an empty config (no 9 s probe)"
    return None


@dataclass
class Measurement:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    output: str


def measure(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Measurement:
    """Run ``cmd``; wall time and peak summed RSS of the process tree.

    The filesystems are synced first, so no run pays for writing back the files of the run before it (a job
    that syncs its own output, as nnsnake's preprocessing does, would otherwise flush those too)."""
    import tempfile

    os.sync()
    with tempfile.TemporaryFile(mode="w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - start
        log.seek(0)
        output = log.read()
    return Measurement(wall, peak / 2**20, proc.returncode, output)


def anchor_bin(name: str) -> str:
    path = ANCHOR_VENV / "bin" / name
    if not path.exists():
        sys.exit(f"{path} not found: create the anchor venv with ../shared/anchor/setup_anchor_env.sh")
    return str(path)


def install_anchor_trainer(source: Path) -> None:
    """Copy a benchmark trainer class file to the top level of the anchor's nnunetv2/training/nnUNetTrainer/,
    where nnunetv2 finds trainers by class name (skipped when an identical copy is there)."""
    import filecmp
    import shutil

    folder = subprocess.run(
        [
            anchor_bin("python"),
            "-c",
            "import nnunetv2, os; print(os.path.join(os.path.dirname(nnunetv2.__file__), "
            "'training', 'nnUNetTrainer'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = Path(folder) / source.name
    if not target.exists() or not filecmp.cmp(source, target, shallow=False):
        shutil.copy(source, target)


def nnunet_env(root: Path, threads: int = 1) -> dict[str, str]:
    """Environment for nnunetv2 CLIs with raw/preprocessed/results under ``root``."""
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(root / "raw"),
        nnUNet_preprocessed=str(root / "pre"),
        nnUNet_results=str(root / "res"),
        OMP_NUM_THREADS=str(threads),
    )
    for sub in ("raw", "pre", "res"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return env


def link_raw(root: Path, dataset_dir: Path) -> None:
    link = root / "raw" / dataset_dir.name
    if not link.exists():
        link.symlink_to(dataset_dir.resolve())


def dataset_id(dataset_dir: Path) -> str:
    return str(int(dataset_dir.name[7:10]))


def folder_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
