"""The package's shape, as docs/architecture.md describes it: checked on the source, without running anything.

- the Snakemake scripts and the CLI are thin: they import only ``nnsnake.steps`` and the standard library;
- the library does not depend on Snakemake;
- label semantics live in ``labels.py``: no other module reads ``dataset_json["labels"]`` (``dataset.py`` checks
  that entry when it verifies a dataset, the one exception);
- every exception class nnsnake defines is an ``NnsnakeError``, so the CLI can tell a deliberate error from a bug.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

import nnsnake
from nnsnake.errors import NnsnakeError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(nnsnake.__file__).resolve().parent
SCRIPTS = sorted((ROOT / "workflow" / "scripts").glob("*.py"))
MODULES = sorted(PACKAGE.rglob("*.py"))
# modules allowed to interpret dataset.json's "labels": the label model, and the dataset verification
LABEL_OWNERS = {"labels.py", "dataset.py"}
# exceptions that are deliberately no NnsnakeError: how a signal ends training (a SystemExit)
NOT_ERRORS = {"TrainingInterrupted"}


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT if ROOT in path.parents else PACKAGE))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports, as an absolute dotted name (relative imports resolved), with its line;
    ``from nnsnake import steps`` counts as importing ``nnsnake.steps``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                assert PACKAGE in path.parents, f"{path}:{node.lineno}: relative import outside the package"
                package = _module_name(path).split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            if module == "nnsnake":
                found += [(f"nnsnake.{alias.name}", node.lineno) for alias in node.names]
            else:
                found.append((module, node.lineno))
    return found


def _is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


@pytest.mark.parametrize("path", [*SCRIPTS, PACKAGE / "cli.py"], ids=_relative)
def test_scripts_and_cli_import_only_steps(path: Path) -> None:
    wrong = [
        f"line {line}: {module}"
        for module, line in _imports(path)
        if not (_is_stdlib(module) or module == "nnsnake.steps" or module.startswith("nnsnake.steps."))
    ]
    assert not wrong, f"{_relative(path)} may import only nnsnake.steps and the standard library: {wrong}"


def test_every_rule_runs_a_script_or_a_step() -> None:
    """Each rule either runs a thin script of workflow/scripts/ or, for the light rules, one nnsnake.steps
    function through run_step (inside Snakemake's own process locally): nothing else does work in a .smk file."""
    rules = ROOT / "workflow" / "rules"
    scripted, stepped = set(), set()
    for smk in rules.glob("*.smk"):
        text = smk.read_text()
        scripted |= set(re.findall(r'"\.\./scripts/(\w+)\.py"', text))
        for body in re.findall(r"\n    run:\n((?:        .*\n|\n)+)", text):
            assert body.lstrip().startswith("run_step(\n") or body.lstrip().startswith("run_step(steps."), (
                body
            )
            stepped.add(body)
    assert {p.stem for p in SCRIPTS} == scripted
    assert len(scripted) >= 8 and len(stepped) >= 6


def test_job_scripts_and_only_they_end_their_process_early() -> None:
    """``steps.finish_job_process()`` skips the interpreter's teardown: the last statement of every job script,
    and nowhere else (in a rule's ``run:`` block it would end Snakemake itself)."""
    for path in SCRIPTS:
        last = ast.parse(path.read_text()).body[-1]
        assert ast.unparse(last) == "steps.finish_job_process()", f"{_relative(path)} must end with it"
    elsewhere = [
        _relative(path)
        for path in [*MODULES, *(ROOT / "workflow").rglob("*.smk"), ROOT / "Snakefile"]
        if path.is_file() and "finish_job_process()" in path.read_text()
    ]
    assert not elsewhere, f"finish_job_process() may end only job scripts: {elsewhere}"


def test_library_does_not_import_snakemake() -> None:
    wrong = [
        f"{_relative(path)}:{line}"
        for path in MODULES
        for module, line in _imports(path)
        if module.split(".")[0] == "snakemake"
    ]
    assert not wrong, f"library modules import snakemake: {wrong}"


def _is_copied(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """The entry is stored as it is (a value of a dict literal, possibly through ``dict(...)``): a record of what
    the dataset said, such as a checkpoint's or a manifest's ``labels``, not an interpretation of it."""
    parent = parents.get(node)
    if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id == "dict":
        node, parent = parent, parents.get(parent)
    return isinstance(parent, ast.Dict) and any(value is node for value in parent.values)


def _labels_subscripts(path: Path) -> list[int]:
    """Lines that read ``<dataset.json>["labels"]``: a ``["labels"]`` subscript of an expression that names a
    dataset or a JSON document (``dataset_json``, ``self.dataset_json``, ``read_json(path)``), the entry only the
    label model interprets; other ``"labels"`` keys (a postprocessing step's, the bootstrap's) are not
    dataset.json's, and verbatim copies into a record are no interpretation."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Subscript)
        and isinstance(node.slice, ast.Constant)
        and node.slice.value == "labels"
        and any(word in ast.unparse(node.value).lower() for word in ("dataset", "json"))
        and not _is_copied(node, parents)
    ]


def test_label_semantics_live_in_labels_py() -> None:
    wrong = [
        f"{_relative(path)}:{line}"
        for path in MODULES
        if path.name not in LABEL_OWNERS or path.parent != PACKAGE
        for line in _labels_subscripts(path)
    ]
    assert not wrong, (
        'only labels.py (and dataset.py, verifying) may read dataset_json["labels"]; use '
        f"nnsnake.labels.LabelModel instead: {wrong}"
    )


def _defined_exceptions() -> list[type[BaseException]]:
    """Every exception class defined (not just imported) in a module of the package."""
    classes = []
    for path in MODULES:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        if not names:
            continue
        module = importlib.import_module(_module_name(path))
        for name in sorted(names):
            cls = getattr(module, name, None)
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                classes.append(cls)
    return classes


def test_every_exception_is_an_nnsnake_error() -> None:
    classes = _defined_exceptions()
    assert any(cls is NnsnakeError for cls in classes)
    wrong = [
        f"{cls.__module__}.{cls.__name__}"
        for cls in classes
        if cls.__name__ not in NOT_ERRORS and not issubclass(cls, NnsnakeError)
    ]
    assert not wrong, f"exception classes that are not nnsnake.errors.NnsnakeError subclasses: {wrong}"
