"""Readable tables of the model selection for ``snakemake --report``.

Snakemake's HTML report shows images inline and HTML files in a frame, but offers JSON and CSV files only as
downloads. The numbers a reader needs to trust the chosen model (every candidate's cross-validation Dice, its
bootstrap interval and probability of being best, and the postprocessing trials) therefore become small
self-contained HTML pages, built here with pandas from the contents of the files the workflow already wrote;
:mod:`nnsnake.steps.report` reads those files and writes the pages (and a CSV copy of the cross-validation table,
for further analysis).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .labels import LabelModel

FOREGROUND = "all_foreground"
_HIGHLIGHT = "background-color: #fff3c4; font-weight: 600"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px;
       color: #1f2328; margin: 1.2em; }
h1 { font-size: 1.3em; margin: 0 0 0.4em 0; }
p { max-width: 70em; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.6em 0 1em 0; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.7em; }
th { background: #f0f3f6; text-align: center; }
td { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #57606a; font-size: 0.92em; }
"""


def label_names(dataset_json: Mapping[str, Any]) -> dict[str, str]:
    """Summary key of every foreground label or region -> ``"<name> (<key>)"``, so columns say what they score
    (the label model's :meth:`~nnsnake.labels.LabelModel.display_names`, from a dataset.json mapping)."""
    return LabelModel.from_dataset_json(dataset_json).display_names()


def _candidate_dice(summary: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float]:
    means = summary.get("mean", {})
    values = {key: float(means[key]["Dice"]) if key in means else math.nan for key in keys}
    values[FOREGROUND] = float(summary.get("foreground_mean", {}).get("Dice", math.nan))
    return values


def crossval_table(
    summaries: Mapping[str, Mapping[str, Any]],
    bootstrap: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per candidate: per-label and foreground-mean Dice, bootstrap mean, interval, P(best) and choice.

    ``summaries`` maps candidate names (configurations and ``ensemble_<a>+<b>``) to their cross-validation
    ``summary.json`` contents; ``bootstrap`` is ``bootstrap.json`` (:func:`nnsnake.selection.bootstrap_selection`),
    whose candidate order (single configurations first) is kept; ``names`` labels the Dice columns
    (:func:`label_names`). Candidates the bootstrap did not score get empty bootstrap cells rather than vanishing,
    so a stale or partial selection is visible.
    """
    bootstrap = bootstrap or {}
    scored = bootstrap.get("candidates", {})
    order = [c for c in bootstrap.get("order", []) if c in summaries] + [
        c for c in summaries if c not in bootstrap.get("order", [])
    ]
    keys = list(bootstrap.get("labels") or [])
    for summary in summaries.values():
        keys += [k for k in summary.get("mean", {}) if k not in keys and k not in ("0", "(0,)")]
    names = dict(names or {})
    percent = int(round(100 * float(bootstrap.get("confidence", 0.95))))
    rows = []
    for candidate in order:
        dice = _candidate_dice(summaries[candidate], keys)
        info = scored.get(candidate, {})
        choice = []
        if candidate == bootstrap.get("selected"):
            choice.append("selected")
        if candidate == bootstrap.get("nnunet_choice"):
            choice.append("nnU-Net's choice")
        row: dict[str, Any] = {"candidate": candidate}
        row |= {f"Dice {names.get(key, key)}": dice[key] for key in keys}
        row |= {
            "foreground mean Dice": dice[FOREGROUND],
            "bootstrap mean": info.get("bootstrap_mean", math.nan),
            f"{percent} % CI low": info.get("ci_low", math.nan),
            f"{percent} % CI high": info.get("ci_high", math.nan),
            "P(best)": info.get("p_best", math.nan),
            "choice": ", ".join(choice),
        }
        rows.append(row)
    return pd.DataFrame(rows)


def _scope_name(step: Mapping[str, Any], names: Mapping[str, str]) -> str:
    labels = ", ".join(str(v) for v in step.get("labels", []))
    if step.get("scope") == FOREGROUND:
        return f"whole foreground (labels {labels})"
    scope = str(step.get("scope"))
    return f"label {names.get(scope, scope)}"


def postprocessing_table(decision: Mapping[str, Any], names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per postprocessing trial of ``postprocessing.json``: what was tried, Dice before/after, decision.

    Columns are two-level (``("Dice Anterior (1)", "before")``, ...), so the page shows each score's pair under
    one heading.
    """
    names = dict(names or {})
    keys = [str(k) for k in decision.get("labels_or_regions", [])]
    rows = []
    for trial in decision.get("trials", []):
        before, after = trial.get("before", {}), trial.get("after", {})
        row: dict[tuple[str, str], Any] = {
            ("keep the largest component of", ""): _scope_name(trial.get("step", {}), names),
            ("foreground mean Dice", "before"): before.get("foreground_mean", math.nan),
            ("foreground mean Dice", "after"): after.get("foreground_mean", math.nan),
        }
        for key in keys:
            label = f"Dice {names.get(key, key)}"
            row[(label, "before")] = before.get("mean", {}).get(key, math.nan)
            row[(label, "after")] = after.get("mean", {}).get(key, math.nan)
        row[("accepted if", "")] = trial.get("rule", "")
        row[("decision", "")] = "applied" if trial.get("accepted") else "rejected"
        rows.append(row)
    return pd.DataFrame(rows, columns=pd.MultiIndex.from_tuples(rows[0]) if rows else None)


def _styled_table(frame: pd.DataFrame, table_id: str, highlight: Sequence[bool] | None = None) -> str:
    """The frame as an HTML table: 4 decimals, empty cells for NaN, highlighted rows; a fixed id keeps it stable."""
    if frame.empty:
        return "<p><em>nothing to show</em></p>"
    flags = list(highlight) if highlight is not None else [False] * len(frame)
    styler = frame.style.format(precision=4, na_rep="", escape="html").hide(axis="index").set_uuid(table_id)
    text_columns = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    styler = styler.set_properties(subset=text_columns, **{"text-align": "left"})
    if any(flags):
        styler = styler.apply(lambda column: [_HIGHLIGHT if flag else "" for flag in flags], axis=0)
    return styler.to_html()


def html_page(title: str, blocks: Sequence[str]) -> str:
    """A self-contained page (inline style, no scripts or external files): the report embeds it as a data URI."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(blocks) + "\n</body>\n</html>\n"
    )


def _fmt(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


def crossval_page(table: pd.DataFrame, bootstrap: Mapping[str, Any], dataset: str = "") -> str:
    """The cross-validation table as a page, the selected row highlighted and the selection stated in words."""
    selected = bootstrap.get("selected")
    nnunet = bootstrap.get("nnunet_choice")
    lines = []
    if selected is not None:
        info = bootstrap.get("candidates", {}).get(selected, {})
        text = (
            f"Selected: <b>{html.escape(str(selected))}</b>, foreground mean Dice {_fmt(info.get('score'))} "
            f"(bootstrap {int(round(100 * float(bootstrap.get('confidence', 0.95))))} % interval "
            f"{_fmt(info.get('ci_low'))} to {_fmt(info.get('ci_high'))}, P(best) {_fmt(info.get('p_best'))}). "
        )
        if nnunet == selected:
            text += "This is also nnU-Net's choice (highest pooled score)."
        else:
            text += (
                f"nnU-Net's choice would be <b>{html.escape(str(nnunet))}</b>; the cheaper candidate stands "
                f"because the better one won fewer than {bootstrap.get('min_win_share')} of the resamples."
            )
        lines.append(f"<p>{text}</p>")
    if "n_bootstrap" in bootstrap:
        lines.append(
            f'<p class="note">{bootstrap.get("n_cases")} cross-validation cases; '
            f"{bootstrap['n_bootstrap']} bootstrap resamples of the cases (seed {bootstrap.get('seed')}). "
            "Dice columns are means over cases of the pooled cross-validation predictions (cases whose reference "
            "and prediction are both empty are skipped); the foreground mean is their mean over labels and is "
            "the score nnU-Net ranks by.</p>"
        )
    highlight = [c == selected for c in table.get("candidate", [])]
    lines.append(_styled_table(table, "crossval", highlight))
    title = f"Cross-validation of every candidate{' on ' + dataset if dataset else ''}"
    return html_page(title, lines)


def postprocessing_page(
    table: pd.DataFrame,
    decision: Mapping[str, Any],
    names: Mapping[str, str] | None = None,
) -> str:
    """The postprocessing decision as a page: what is applied at prediction time, then every trial."""
    names = dict(names or {})
    steps = decision.get("steps", [])
    if steps:
        applied = "keep the largest connected component of " + "; ".join(
            f"<b>{html.escape(_scope_name(step, names))}</b>" for step in steps
        )
    else:
        applied = "<b>nothing</b> (predictions are used as the network gives them)"
    lines = [
        f"<p>Candidate <b>{html.escape(str(decision.get('selected', '?')))}</b>, "
        f"{decision.get('n_cases', '?')} cross-validation cases. Applied at prediction time: {applied}.</p>",
        f"<p>Foreground mean Dice {_fmt(decision.get('result_on_crossval_pre_pp'))} without and "
        f"{_fmt(decision.get('result_on_crossval_post_pp'))} with the applied postprocessing.</p>",
        '<p class="note">Trials run in order, each starting from the best result so far: first the whole '
        "foreground, then (with more than one label) each label alone. A trial is applied only when it meets its "
        "rule on the cross-validation predictions.</p>",
    ]
    lines.append(
        _styled_table(table, "postprocessing", [d == "applied" for d in table.get(("decision", ""), [])])
    )
    return html_page("Postprocessing decision", lines)


def __getattr__(name: str) -> Any:
    """The file-level report functions moved to :mod:`nnsnake.steps.report`; the old names still resolve."""
    if name in ("write_crossval_report", "write_postprocessing_report"):
        from .steps import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
