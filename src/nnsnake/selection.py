"""Model selection over the cross-validation: nnU-Net's choice plus a bootstrap of the cases.

nnU-Net (docs/method.md §8.1) scores every candidate (each configuration and every pair of configurations, whose
probabilities are averaged) by the foreground-mean Dice of its pooled 5-fold cross-validation and takes the
highest; on an exact tie the first candidate wins, and single configurations come before ensembles.

nnsnake keeps that choice by default and adds what a point estimate cannot say (docs/method.md §8.4):
1000 seeded resamples of the cross-validation cases (drawn with replacement, the same draws for every candidate)
give each candidate a bootstrap mean, a 95 % percentile interval and the probability of being best, and let a
cheaper candidate (fewer members: a single configuration over an ensemble) stand when the better one does not
win clearly. See :func:`bootstrap_selection` for the exact rule.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

from .errors import SelectionError

ENSEMBLE_PREFIX = "ensemble_"
ENSEMBLE_SEPARATOR = "+"
# a member of another planner than the default one is <plans_name>__<configuration> (nnU-Net's id style)
DEFAULT_PLANS_NAME = "nnUNetPlans"
PLANS_SEPARATOR = "__"

RULE = (
    "nnU-Net's choice is the candidate with the highest pooled score (foreground mean over labels of the "
    "NaN-ignoring mean Dice over cases); ties go to the first candidate, with cheaper candidates (fewer members) "
    "ordered first. Then, while a cheaper candidate exists, the chosen one is compared with the best cheaper "
    "candidate: its win share is the fraction of bootstrap resamples in which it scores higher, after the "
    "resampled score differences are shifted so that their median equals the observed pooled difference (an exact "
    "pooled tie counts as a win share of 0.5). If the win share is below min_win_share the cheaper candidate is "
    "chosen instead and compared in turn with still cheaper ones. The pooled winner's win share is never below "
    "0.5, so min_win_share <= 0.5 always reproduces nnU-Net's choice."
)


# --------------------------------------------------------------------------------------------------- candidates
def ensemble_name(members: Sequence[str]) -> str:
    """``ensemble_<a>+<b>``: the results-folder name of an ensemble of configurations, in the given order."""
    if len(members) < 2:
        raise SelectionError(f"an ensemble needs at least two members, got {list(members)}")
    for member in members:
        if ENSEMBLE_SEPARATOR in member or member.startswith(ENSEMBLE_PREFIX):
            raise SelectionError(
                f"configuration name {member!r} cannot be an ensemble member (contains "
                f"{ENSEMBLE_SEPARATOR!r} or starts with {ENSEMBLE_PREFIX!r})"
            )
    return ENSEMBLE_PREFIX + ENSEMBLE_SEPARATOR.join(members)


def member_id(plans_name: str, configuration: str) -> str:
    """A trained configuration's candidate name: the bare configuration for the default planner's plans (so
    single-planner results keep their names), ``<plans_name>__<configuration>`` for the others."""
    if plans_name == DEFAULT_PLANS_NAME:
        return configuration
    return f"{plans_name}{PLANS_SEPARATOR}{configuration}"


def split_member(member: str) -> tuple[str, str]:
    """``(plans_name, configuration)`` of a member name made by :func:`member_id`."""
    plans_name, separator, configuration = member.partition(PLANS_SEPARATOR)
    return (plans_name, configuration) if separator else (DEFAULT_PLANS_NAME, member)


def candidate_members(candidate: str) -> list[str]:
    """The configurations a candidate consists of (one for a single configuration)."""
    if candidate.startswith(ENSEMBLE_PREFIX):
        return candidate[len(ENSEMBLE_PREFIX) :].split(ENSEMBLE_SEPARATOR)
    return [candidate]


def candidate_cost(candidate: str) -> int:
    """Inference cost of a candidate in model evaluations: its number of members."""
    return len(candidate_members(candidate))


def candidate_names(configurations: Sequence[str], allow_ensembles: bool = True) -> list[str]:
    """nnU-Net's candidate order: every configuration, then every unordered pair (i < j) as an ensemble."""
    names = list(configurations)
    if allow_ensembles:
        names += [ensemble_name([a, b]) for a, b in combinations(configurations, 2)]
    return names


def ensemble_probabilities(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the members' class probabilities (float32, as nnU-Net averages configuration ensembles)."""
    if not probabilities:
        raise SelectionError("ensemble_probabilities needs at least one probability array")
    shapes = {tuple(p.shape) for p in probabilities}
    if len(shapes) != 1:
        raise SelectionError(f"probability arrays of an ensemble differ in shape: {sorted(shapes)}")
    total = np.array(probabilities[0], dtype=np.float32, copy=True)
    for p in probabilities[1:]:
        total += p
    total /= len(probabilities)
    return total


# ------------------------------------------------------------------------------------------------------- scores
def _score_table(
    per_case_scores: Mapping[str, Mapping[str, Any]],
) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """Cases, label keys and one ``(n_cases, n_labels)`` array per candidate (scalars become one pseudo-label)."""
    if not per_case_scores:
        raise SelectionError("no candidates to select from")
    first_name, first = next(iter(per_case_scores.items()))
    cases = list(first)
    if not cases:
        raise SelectionError(f"candidate {first_name} has no cases")
    per_label = isinstance(first[cases[0]], Mapping)
    labels = [k for k in first[cases[0]] if k != "0"] if per_label else ["score"]
    if not labels:
        raise SelectionError(f"candidate {first_name}: no foreground label scores in case {cases[0]}")
    tables = {}
    for name, scores in per_case_scores.items():
        if set(scores) != set(cases):
            missing = sorted(set(cases) - set(scores))
            extra = sorted(set(scores) - set(cases))
            raise SelectionError(
                f"candidate {name} was scored on other cases than {first_name} (missing {missing[:5]}, extra "
                f"{extra[:5]}); all candidates must cover the same cross-validation cases"
            )
        table = np.empty((len(cases), len(labels)), dtype=np.float64)
        for i, case in enumerate(cases):
            value = scores[case]
            if per_label:
                if not isinstance(value, Mapping) or any(label not in value for label in labels):
                    raise SelectionError(
                        f"candidate {name}, case {case}: expected scores for labels {labels}"
                    )
                table[i] = [float(value[label]) for label in labels]
            else:
                if isinstance(value, Mapping):
                    raise SelectionError(
                        f"candidate {name}, case {case}: mixes per-label and per-case scores"
                    )
                table[i, 0] = float(value)
        tables[name] = table
    return cases, labels, tables


def pooled_score(table: np.ndarray) -> float:
    """nnU-Net's cross-validation score: plain mean over labels of the NaN-ignoring mean over cases."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.mean([np.nanmean(table[:, j]) for j in range(table.shape[1])]))


def _resampled_scores(table: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The pooled score of every resample (``counts[b, i]`` = how often case i was drawn in resample b)."""
    finite = np.isfinite(table)
    sums = counts @ np.where(finite, table, 0.0)
    n_valid = counts @ finite.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        label_means = sums / n_valid
    label_means[n_valid == 0] = np.nan
    return label_means.mean(axis=1)


def _first_best(order: Sequence[str], scores: Mapping[str, float]) -> str | None:
    """First candidate (in ``order``) with the highest finite score; ``None`` if none is finite."""
    best, best_score = None, -math.inf
    for name in order:
        if math.isfinite(scores[name]) and scores[name] > best_score:
            best, best_score = name, scores[name]
    return best


def _win_share(observed: float, resampled_differences: np.ndarray) -> float:
    """Share of resamples the better candidate wins, with the differences' median moved to ``observed``."""
    finite = resampled_differences[np.isfinite(resampled_differences)]
    if observed == 0 or finite.size == 0:
        return 0.5
    shifted = observed + (finite - np.median(finite))
    return float(np.mean(shifted > 0))


def bootstrap_selection(
    per_case_scores: Mapping[str, Mapping[str, float | Mapping[str, float]]],
    n_bootstrap: int = 1000,
    seed: int = 0,
    cost: Mapping[str, int] | None = None,
    min_win_share: float = 0.5,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Choose among candidates as nnU-Net does, with bootstrap intervals and a cheaper-candidate rule.

    ``per_case_scores[candidate][case]`` is either the case's Dice per label key (``{"1": 0.9, "2": 0.8}``,
    e.g. from :func:`nnsnake.metrics.per_case_metric`; exact nnU-Net score) or one number per case (then the
    score is the NaN-ignoring mean over cases). All candidates must cover the same cases; pass them in nnU-Net's
    order (:func:`candidate_names`). ``cost`` defaults to the number of members of each candidate.

    The score of a candidate is nnU-Net's: for every label the NaN-ignoring mean over cases, then the plain mean
    over labels (a label with no finite value makes it NaN; a NaN score never wins). ``n_bootstrap`` resamples of
    the cases with replacement (``numpy.random.default_rng(seed)``, the same draws for every candidate) recompute
    that score; each candidate gets the bootstrap mean, the ``confidence`` percentile interval and ``p_best``, the
    share of resamples in which it scores highest (ties to the first in order).

    Rule: start from nnU-Net's choice (highest pooled score; exact ties go to the candidate that comes first after
    a stable sort by cost, i.e. single configurations before ensembles). While a strictly cheaper candidate
    exists, compare the current choice with the best of them: the *win share* is the fraction of resamples in
    which the current choice scores higher, computed on the resampled differences shifted so that their median
    equals the observed pooled difference (this removes the bias of a resampled non-linear score); an exact
    pooled tie has win share 0.5. If the win share is below ``min_win_share``, the cheaper candidate becomes the
    choice and the comparison repeats with still cheaper ones; otherwise the current choice stays. Because the
    shifted median is the observed difference, which is >= 0 for the pooled winner, its win share is always at
    least 0.5: ``min_win_share <= 0.5`` (default 0.5) gives exactly nnU-Net's choice, and larger values demand
    that the more expensive candidate wins that share of resamples.
    """
    if not 0.0 <= min_win_share <= 1.0:
        raise SelectionError(f"min_win_share must lie in [0, 1], got {min_win_share}")
    if n_bootstrap < 1:
        raise SelectionError(f"n_bootstrap must be positive, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise SelectionError(f"confidence must lie in (0, 1), got {confidence}")
    cases, labels, tables = _score_table(per_case_scores)
    names = list(tables)
    costs = {
        name: int(cost[name]) if cost is not None and name in cost else candidate_cost(name) for name in names
    }
    # nnU-Net's order decides exact ties: stable, single configurations before ensembles (whatever ``cost`` says)
    order = sorted(names, key=candidate_cost)

    pooled = {name: pooled_score(tables[name]) for name in names}
    nnunet_choice = _first_best(order, pooled)
    if nnunet_choice is None:
        raise SelectionError(
            f"every candidate's pooled score is NaN ({', '.join(names)}); no foreground label "
            "has a finite Dice in any case"
        )
    counts = _resample_counts(len(cases), n_bootstrap, seed)
    resampled = {name: _resampled_scores(tables[name], counts) for name in names}
    alpha = (1.0 - confidence) / 2.0
    selected, comparisons = _cheaper_candidate_rule(
        nnunet_choice, order, costs, pooled, resampled, min_win_share, alpha
    )
    return {
        "selected": selected,
        "nnunet_choice": nnunet_choice,
        "candidates": _candidate_summaries(order, costs, pooled, resampled, alpha),
        "order": order,
        "comparisons": comparisons,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "confidence": confidence,
        "min_win_share": min_win_share,
        "n_cases": len(cases),
        "labels": labels,
        "rule": RULE,
        "resample_scores": {name: resampled[name].tolist() for name in order},
    }


def _resample_counts(n_cases: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``counts[b, i]``: how often case i is drawn in resample b (``default_rng(seed)``, with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_cases, size=(n_bootstrap, n_cases))
    flat = (draws + n_cases * np.arange(n_bootstrap)[:, None]).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n_cases).reshape(n_bootstrap, n_cases).astype(np.float64)


def _candidate_summaries(
    order: Sequence[str],
    costs: Mapping[str, int],
    pooled: Mapping[str, float],
    resampled: Mapping[str, np.ndarray],
    alpha: float,
) -> dict[str, dict[str, Any]]:
    """Each candidate's pooled score, bootstrap mean, percentile interval and probability of being best."""
    stacked = np.stack([resampled[name] for name in order])  # (K, B) in tie-breaking order
    filled = np.where(np.isfinite(stacked), stacked, -np.inf)
    winners = np.argmax(filled, axis=0)  # first maximum wins ties
    has_winner = np.isfinite(filled).any(axis=0)
    summary = {}
    for k, name in enumerate(order):
        values = resampled[name][np.isfinite(resampled[name])]
        summary[name] = {
            "score": pooled[name],
            "cost": costs[name],
            "members": candidate_members(name),
            "bootstrap_mean": float(values.mean()) if values.size else math.nan,
            "ci_low": float(np.quantile(values, alpha)) if values.size else math.nan,
            "ci_high": float(np.quantile(values, 1.0 - alpha)) if values.size else math.nan,
            "p_best": float(np.mean((winners == k) & has_winner)),
            "n_finite_resamples": int(values.size),
        }
    return summary


def _cheaper_candidate_rule(
    nnunet_choice: str,
    order: Sequence[str],
    costs: Mapping[str, int],
    pooled: Mapping[str, float],
    resampled: Mapping[str, np.ndarray],
    min_win_share: float,
    alpha: float,
) -> tuple[str, list[dict[str, Any]]]:
    """From nnU-Net's choice, step to the best cheaper candidate while the current one wins less than
    ``min_win_share`` of the resamples; returns the choice and every comparison made."""
    current = nnunet_choice
    comparisons = []
    while True:
        cheaper = [name for name in order if costs[name] < costs[current]]
        challenger = _first_best(cheaper, pooled)
        if challenger is None:
            break
        observed = pooled[current] - pooled[challenger]
        differences = resampled[current] - resampled[challenger]
        finite = differences[np.isfinite(differences)]
        share = _win_share(observed, differences)
        keep = share >= min_win_share
        comparisons.append(
            {
                "better": current,
                "cheaper": challenger,
                "observed_difference": observed,
                "win_share": share,
                "win_share_unshifted": float(np.mean(finite > 0)) if finite.size else math.nan,
                "difference_ci_low": float(np.quantile(finite, alpha)) if finite.size else math.nan,
                "difference_ci_high": float(np.quantile(finite, 1.0 - alpha)) if finite.size else math.nan,
                "kept": current if keep else challenger,
            }
        )
        if keep:
            break
        current = challenger
    return current, comparisons


def selection_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """The short ``selection.json``: what to predict with, its score, and whether the bootstrap rule changed it."""
    selected = result["selected"]
    return {
        "selected": selected,
        "members": candidate_members(selected),
        "is_ensemble": len(candidate_members(selected)) > 1,
        "score": result["candidates"][selected]["score"],
        "nnunet_choice": result["nnunet_choice"],
        "changed_by_bootstrap": selected != result["nnunet_choice"],
        "all_results": {name: info["score"] for name, info in result["candidates"].items()},
        "min_win_share": result["min_win_share"],
        "n_cases": result["n_cases"],
    }


# ------------------------------------------------------------------------------------------------------- figure
def plot_bootstrap(result: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Draw each candidate's bootstrap distribution, interval and pooled score, and its probability of being best."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = list(result["order"])
    candidates = result["candidates"]
    height = 1.2 + 0.55 * len(order)
    fig = Figure(figsize=(10, height), layout="constrained")
    FigureCanvasAgg(fig)
    ax_dist, ax_best = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    positions = np.arange(len(order))[::-1]
    for pos, name in zip(positions, order, strict=True):
        values = np.asarray(result["resample_scores"][name], dtype=float)
        values = values[np.isfinite(values)]
        colour = "tab:red" if name == result["selected"] else "tab:blue"
        if values.size > 1 and np.ptp(values) > 0:
            try:  # matplotlib >= 3.10 names the orientation; older versions only know vert
                parts = ax_dist.violinplot(
                    values, positions=[pos], orientation="horizontal", showextrema=False, widths=0.8
                )
            except TypeError:
                parts = ax_dist.violinplot(values, positions=[pos], vert=False, showextrema=False, widths=0.8)
            for body in parts["bodies"]:
                body.set_facecolor(colour)
                body.set_alpha(0.3)
        info = candidates[name]
        ax_dist.hlines(pos, info["ci_low"], info["ci_high"], colors=colour, linewidth=2)
        ax_dist.plot(info["score"], pos, "o", color=colour)
        ax_best.barh(pos, info["p_best"], color=colour, alpha=0.7)
        ax_best.text(min(info["p_best"] + 0.02, 0.8), pos, f"{info['p_best']:.2f}", va="center", fontsize=8)
    labels = [f"{name} *" if name == result["selected"] else name for name in order]
    ax_dist.set_yticks(positions, labels)
    ax_dist.set_xlabel(
        f"foreground-mean Dice ({int(round(100 * result['confidence']))} % interval, "
        f"{result['n_bootstrap']} resamples of {result['n_cases']} cases)"
    )
    ax_dist.grid(axis="x", alpha=0.3)
    ax_best.set_xlim(0, 1)
    ax_best.set_xlabel("P(best)")
    fig.suptitle(
        f"selected: {result['selected']} (nnU-Net: {result['nnunet_choice']}, "
        f"min win share {result['min_win_share']})",
        fontsize=10,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
