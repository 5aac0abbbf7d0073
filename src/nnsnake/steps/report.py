"""crossval_table and postprocessing_table: the model selection as pages for ``snakemake --report``.

The tables and pages themselves are built by :mod:`nnsnake.reporting` (pure, from file contents); these entry
functions read the workflow's files and write the pages atomically. Column names come from the label model
(:meth:`nnsnake.labels.LabelModel.display_names`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..jsonio import atomic_write_bytes, read_json
from ._common import PathLike, log

if TYPE_CHECKING:
    import pandas as pd


def _display_names(dataset_json_path: PathLike) -> dict[str, str]:
    from ..labels import LabelModel

    return LabelModel.from_dataset_json(read_json(dataset_json_path)).display_names()


def crossval_table(
    candidates: Mapping[str, PathLike],
    bootstrap_path: PathLike,
    dataset_json_path: PathLike,
    html_path: PathLike,
    csv_path: PathLike | None = None,
) -> pd.DataFrame:
    """Read the candidates' cross-validation summaries (``candidates``: name -> ``summary.json``) and
    ``bootstrap.json``; write the table page (and the CSV) atomically; return the table."""
    from ..reporting import crossval_page
    from ..reporting import crossval_table as build_table

    bootstrap = read_json(bootstrap_path)
    summaries = {name: read_json(path) for name, path in candidates.items()}
    table = build_table(summaries, bootstrap, _display_names(dataset_json_path))
    dataset = os.path.basename(os.path.dirname(os.path.abspath(dataset_json_path)))
    atomic_write_bytes(html_path, crossval_page(table, bootstrap, dataset).encode("utf-8"))
    if csv_path is not None:
        atomic_write_bytes(csv_path, table.to_csv(index=False).encode("utf-8"))
    log.info("cross-validation table of %d candidates:\n%s", len(table), table.to_string(index=False))
    return table


def postprocessing_table(
    decision_path: PathLike, dataset_json_path: PathLike, html_path: PathLike
) -> pd.DataFrame:
    """Read ``postprocessing.json``; write its decision and every trial as a page atomically; return the table."""
    from ..reporting import postprocessing_page
    from ..reporting import postprocessing_table as build_table

    names = _display_names(dataset_json_path)
    decision = read_json(decision_path)
    table = build_table(decision, names)
    atomic_write_bytes(html_path, postprocessing_page(table, decision, names).encode("utf-8"))
    log.info("postprocessing trials:\n%s", table.to_string(index=False))
    return table


write_crossval_report = crossval_table
"""The name :func:`crossval_table` had as ``nnsnake.reporting.write_crossval_report``."""
write_postprocessing_report = postprocessing_table
"""The name :func:`postprocessing_table` had as ``nnsnake.reporting.write_postprocessing_report``."""
