"""Shared pytest fixtures.

``shared_data`` points at the real datasets in ``../shared/data`` (override with ``NNSNAKE_SHARED``) and skips
the test cleanly when they are absent. ``REPO`` is the repository root. ``finished_demo`` is one run of the
README's main command on the embedded demo, shared by the tests that inspect its outputs (run once per session).

The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml): most of a workflow
test's time is process start-up, Snakemake's scheduling and the SLURM test's waits, so two of them share the
2-core CI machine well. Each module is one work unit (its module-scoped fixtures run once), the tests on the
finished demo are one unit (it runs once), and the longest units start first so that no worker is left with a
long one at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NNSNAKE_SHARED", REPO.parent / "shared"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# Work units longest first (measured durations on 2 cores, most of them end-to-end workflow runs); the rest follow
# in collection order.
LONGEST_FIRST = (
    "tests.test_slurm",
    "finished_demo",
    "tests.test_labels_workflow",
    "tests.test_resume",
    "tests.test_cascade",
    "tests.test_planners_workflow",
    "tests.test_invalidation",
)


def work_unit(item: pytest.Item) -> str:
    """The xdist group of a test: the finished demo's tests together, otherwise the test's module."""
    if "finished_demo" in getattr(item, "fixturenames", ()):
        return "finished_demo"
    return item.module.__name__ if isinstance(item, pytest.Function) else item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group the tests into xdist work units and put the longest units first (see the module docstring)."""
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    units = {item.nodeid: work_unit(item) for item in items}
    items.sort(key=lambda item: rank.get(units[item.nodeid], len(rank)))  # stable: collection order otherwise
    for item in items:
        item.add_marker(pytest.mark.xdist_group(units[item.nodeid]))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    data = SHARED / "data"
    if not (data / "Dataset004_Hippocampus" / "dataset.json").is_file():
        pytest.skip(f"shared datasets not found at {data}")
    return data


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Tests share a 2-core machine: keep numeric libraries to one thread."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass


@pytest.fixture(autouse=True, scope="session")
def _no_slurm_probe_outside_the_slurm_tests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point SLURM's commands at an empty config for the tests that do not use SLURM.

    Every snakemake start imports the SLURM executor plugin, which runs ``scontrol show config``. Once
    tests/slurm/slurm_local.sh has configured a cluster and stopped it again, that call retries for 9 s before
    it gives up, so every later snakemake call in the session would wait 9 s; with an empty config it fails at
    once. tests/test_slurm.py's cluster fixture puts the real config back for its own duration.
    """
    if "SLURM_CONF" in os.environ:  # the caller chose a SLURM config: leave it
        yield
        return
    empty = tmp_path_factory.mktemp("no_slurm") / "slurm.conf"
    empty.touch()
    os.environ["SLURM_CONF"] = str(empty)
    try:
        yield
    finally:
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private workflow copy in which the demo's main job (all 5 folds) has run to completion."""
    from .test_workflow import DEMO, snakemake, workflow_copy

    wd = workflow_copy(tmp_path_factory.mktemp("demo"))
    # a generous limit: under pytest-xdist the other worker shares the cores
    snakemake(wd, "--resources", "gpu=1", "--config", f"dataset={DEMO}", timeout=3600)
    return wd
