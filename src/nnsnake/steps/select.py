"""select and postprocess: the candidate to predict with and its postprocessing (docs/method.md §8.1, §8.2, §8.4).

:func:`select` applies nnU-Net's rule plus the bootstrap of the cases (:mod:`nnsnake.selection`);
:func:`postprocess` decides keep-the-largest-component on the selected candidate's cross-validation predictions.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..deprecation import renamed_keywords
from ..errors import EvaluationError
from ..jsonio import read_json, write_json
from ._common import (
    CONFIGURATION_ORDER,
    CROSSVAL_FILE,
    PLANS_FILE,
    POSTPROCESSING_FILE,
    TRAINER_NAME,
    PathLike,
    case_files,
    configuration_of,
    dataset_json_of,
    log,
    reference_files,
)


def _candidate_sort_key(name: str) -> tuple[int, list[tuple[int, int, str, str]]]:
    """nnU-Net's candidate order: singles before pairs; the default planner's plans first, then the others by
    name; within a plans name configurations 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres, then derived ones."""
    from ..selection import DEFAULT_PLANS_NAME, candidate_members, split_member

    def member_key(member: str) -> tuple[int, int, str, str]:
        plans_name, configuration = split_member(member)
        rank = (
            CONFIGURATION_ORDER.index(configuration)
            if configuration in CONFIGURATION_ORDER
            else len(CONFIGURATION_ORDER)
        )
        return (plans_name != DEFAULT_PLANS_NAME, rank, plans_name, configuration)

    members = candidate_members(name)
    return len(members), [member_key(m) for m in members]


def _parameter_counts(
    members: Sequence[str], plans_by_name: Mapping[str, Mapping[str, Any]], dataset_json: Mapping[str, Any]
) -> dict[str, int]:
    """Network parameters a member needs at prediction time (a cascade stage counts its previous stage too),
    from the plans alone (:func:`nnsnake.architecture.parameter_count`: no torch, no network built)."""
    from ..architecture import num_input_channels, parameter_count
    from ..labels import LabelModel
    from ..selection import split_member

    n_outputs = LabelModel.from_dataset_json(dataset_json).num_outputs
    counts: dict[str, int] = {}
    for member in members:
        plans_name, configuration = split_member(member)
        plans = plans_by_name[plans_name]
        total = 0
        stage: str | None = configuration
        while stage:
            resolved = configuration_of(plans, stage)
            n_inputs = num_input_channels(plans, resolved, dataset_json)
            total += parameter_count(resolved["architecture"], n_inputs, n_outputs)
            stage = resolved.get("previous_stage")
        counts[member] = total
    return counts


def _candidate_costs(
    names: Sequence[str],
    plans_paths: Mapping[str, PathLike],
    dataset_json: Mapping[str, Any] | None,
    extra_configurations: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, int] | None:
    """Each candidate's cost for the cheaper-candidate rule: the parameters of all its members' networks. None
    (cost = number of members) when a member's plans or the dataset.json are not at hand."""
    from ..selection import candidate_members, split_member

    members = sorted({m for name in names for m in candidate_members(name)})
    if dataset_json is None or any(split_member(m)[0] not in plans_paths for m in members):
        return None
    from ..planning import add_extra_configurations

    plans_by_name = {
        name: add_extra_configurations(read_json(path), extra_configurations)
        for name, path in plans_paths.items()
    }
    counts = _parameter_counts(members, plans_by_name, dataset_json)
    return {name: sum(counts[m] for m in candidate_members(name)) for name in names}


def _per_case_dice(
    candidate_summaries: Mapping[str, PathLike], names: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """Each candidate's per-case, per-label Dice from its cross-validation summary."""
    from ..metrics import per_case_metric, read_summary

    per_case = {}
    for name in names:
        path = Path(candidate_summaries[name])
        if not path.is_file():
            raise EvaluationError(
                f"{path}: cross-validation summary of candidate {name} is missing; run crossval"
            )
        per_case[name] = per_case_metric(read_summary(path), "Dice")
    return per_case


def _inference_information(
    record: Mapping[str, Any],
    names: Sequence[str],
    folds: list[str] | None,
    plans: Mapping[str, Any],
    dataset_dir: PathLike | None,
) -> dict[str, Any]:
    """nnU-Net's ``inference_information.json`` fields, so its readers find what they expect."""
    from ..selection import DEFAULT_PLANS_NAME, candidate_cost, split_member

    def model(member: str) -> dict[str, Any]:
        plans_name, configuration = split_member(member)
        if plans_name == DEFAULT_PLANS_NAME:
            plans_name = plans.get("plans_name", plans_name)
        return {"configuration": configuration, "trainer": TRAINER_NAME, "plans_identifier": plans_name}

    return {
        "dataset_name_or_id": plans.get("dataset_name") or (Path(dataset_dir).name if dataset_dir else None),
        "folds": folds,
        "considered_models": list(names),
        "ensembling_allowed": any(candidate_cost(n) > 1 for n in names),
        "all_results": record["all_results"],
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": record["score"],
            "postprocessing_file": POSTPROCESSING_FILE,
            "some_plans_file": PLANS_FILE,
            "selected_model_or_models": [model(m) for m in record["members"]],
        },
    }


def select(
    candidate_summaries: Mapping[str, PathLike],
    output_selection: PathLike,
    output_bootstrap: PathLike,
    output_plot: PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_win_share: float = 0.5,
    dataset_dir: PathLike | None = None,
    plans_path: PathLike | None = None,
    folds: Sequence[int | str] | None = None,
    plans_paths: Mapping[str, PathLike] | None = None,
    extra_configurations: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Choose the configuration or ensemble to predict with, from the candidates' cross-validation summaries.

    ``candidate_summaries`` maps each candidate name (a configuration, or ``ensemble_<a>+<b>`` from
    :func:`nnsnake.selection.ensemble_name`) to its ``crossval/<name>/summary.json``. Candidates are put in
    nnU-Net's order (configurations 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres, then pairs), which decides
    exact ties. The per-case, per-label Dice values go to :func:`nnsnake.selection.bootstrap_selection`.

    Writes ``output_bootstrap`` (every candidate's pooled score, bootstrap mean, interval, P(best), the
    comparisons), ``output_plot``, and ``output_selection`` last: the chosen candidate, its member
    configurations and folds, nnU-Net's ``inference_information`` fields, and (with ``dataset_dir``) a copy of
    dataset.json so that ``nnsnake predict`` needs nothing but the results folder.

    Candidates may come from several planners (``<plans_name>__<configuration>``, see
    :func:`nnsnake.selection.member_id`); ``plans_paths`` maps each plans name to its plans.json (``plans_path``
    is the default planner's). With every member's plans and the dataset.json at hand, a candidate's cost for the
    cheaper-candidate rule is the parameter count of its networks (deterministic, unlike a measured training
    time); otherwise its number of members. ``extra_configurations`` are the derived configurations
    (config ``planning.extra_configurations``), which the plans files do not hold.
    """
    from ..selection import bootstrap_selection, plot_bootstrap, selection_record

    start = time.perf_counter()
    if not candidate_summaries:
        raise EvaluationError("select needs at least one candidate summary")
    from ..selection import DEFAULT_PLANS_NAME

    names = sorted(candidate_summaries, key=_candidate_sort_key)
    per_case = _per_case_dice(candidate_summaries, names)
    dataset_json = dataset_json_of(dataset_dir) if dataset_dir is not None else None
    all_plans = dict(plans_paths or {})
    if plans_path is not None:
        all_plans.setdefault(DEFAULT_PLANS_NAME, plans_path)
    costs = _candidate_costs(names, all_plans, dataset_json, extra_configurations)
    result = bootstrap_selection(
        per_case, n_bootstrap=n_bootstrap, seed=seed, cost=costs, min_win_share=min_win_share
    )
    record = selection_record(result)
    record["cost_measure"] = "network parameters" if costs is not None else "number of members"
    selected = record["selected"]
    if folds is None:
        folds = _crossval_folds(candidate_summaries, record["members"])
    fold_names = [str(f) for f in folds] if folds is not None else None
    plans = read_json(plans_path) if plans_path is not None else {}
    selection_dir = Path(output_selection).parent
    plot_name = os.path.relpath(Path(output_plot), selection_dir)
    record.update(
        {
            "folds": fold_names,
            "crossval_folder": os.path.relpath(Path(candidate_summaries[selected]).parent, selection_dir),
            "candidates": {
                name: {k: result["candidates"][name][k] for k in ("score", "ci_low", "ci_high", "p_best")}
                for name in names
            },
            "bootstrap": {
                "file": os.path.relpath(Path(output_bootstrap), selection_dir),
                "plot": plot_name,
                "n_bootstrap": n_bootstrap,
                "seed": seed,
            },
            "inference_information": _inference_information(record, names, fold_names, plans, dataset_dir),
            "inference_command": "nnsnake predict -i INPUT_FOLDER -o OUTPUT_FOLDER -m " + str(selection_dir),
        }
    )
    if dataset_json is not None:
        record["dataset_json"] = dataset_json
    write_json(output_bootstrap, result)
    plot_bootstrap(result, output_plot)
    write_json(output_selection, record)
    log.info(
        "selected %s (cross-validation foreground mean Dice %.4f; nnU-Net's choice %s) (%.1f s)",
        selected,
        record["score"],
        record["nnunet_choice"],
        time.perf_counter() - start,
    )
    for name in result["order"]:
        info = result["candidates"][name]
        log.info(
            "  %-40s %.4f  [%.4f, %.4f]  P(best) %.2f",
            name,
            info["score"],
            info["ci_low"],
            info["ci_high"],
            info["p_best"],
        )
    return {
        "selected": selected,
        "members": record["members"],
        "score": record["score"],
        "nnunet_choice": record["nnunet_choice"],
        "selection": str(output_selection),
    }


def _crossval_folds(candidate_summaries: Mapping[str, PathLike], members: Sequence[str]) -> list[str] | None:
    """The folds of the selected members, from the ``crossval.json`` beside their summaries."""
    folds: list[str] | None = None
    for member in members:
        if member not in candidate_summaries:
            continue
        record_path = Path(candidate_summaries[member]).parent / CROSSVAL_FILE
        if not record_path.is_file():
            continue
        member_folds = [str(f) for f in read_json(record_path)["folds"]]
        if folds is not None and member_folds != folds:
            raise EvaluationError(
                f"members of the selected ensemble were cross-validated on different folds "
                f"({folds} and {member_folds} in {record_path})"
            )
        folds = member_folds
    return folds


@renamed_keywords(num_processes="processes")
def postprocess(
    selection_path: PathLike,
    dataset_dir: PathLike,
    output_path: PathLike,
    crossval_dir: PathLike | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Decide keep-the-largest-component on the selected candidate's cross-validation predictions (§8.2).

    ``crossval_dir`` defaults to the candidate's folder recorded in ``selection.json`` (``crossval/<selected>``
    beside it), so a rule can depend on every candidate's summary without knowing the winner in advance. Writes
    ``output_path`` (postprocessing.json): the accepted ``steps``, the scores before and after, every trial, and
    ``result_on_crossval_pre_pp`` / ``result_on_crossval_post_pp`` (foreground mean Dice).
    """
    from ..labels import LabelModel
    from ..postprocessing import determine_postprocessing, write_decision

    start = time.perf_counter()
    selection = read_json(selection_path)
    if crossval_dir is None:
        crossval_dir = Path(selection_path).parent / selection["crossval_folder"]
    crossval_dir = Path(crossval_dir)
    dataset_json = dataset_json_of(dataset_dir)
    ending = dataset_json["file_ending"]
    predictions = case_files(crossval_dir, ending)
    if not predictions:
        raise EvaluationError(
            f"{crossval_dir}: no cross-validation predictions ending in {ending!r}; run crossval"
        )
    references = reference_files(dataset_dir, sorted(predictions))
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nnsnake_pp_", dir=output_path.parent) as tmp:
        reference_dir = Path(tmp) / "references"  # exactly the predicted cases, under the predictions' names
        reference_dir.mkdir()
        for case_id, path in references.items():
            target = reference_dir / f"{case_id}{ending}"
            try:
                target.symlink_to(path.resolve())
            except OSError:
                shutil.copy2(path, target)
        decision = determine_postprocessing(
            crossval_dir,
            reference_dir,
            LabelModel.from_dataset_json(dataset_json),
            file_ending=ending,
            processes=processes,
            work_dir=tmp,
            log=log.info,
        )
    decision = dict(decision)
    decision.update(
        {
            "selected": selection["selected"],
            "crossval_folder": os.path.relpath(crossval_dir, output_path.parent),
            "result_on_crossval_pre_pp": decision["input_folder"]["foreground_mean"]["Dice"],
            "result_on_crossval_post_pp": decision["postprocessed"]["foreground_mean"]["Dice"],
        }
    )
    write_decision(output_path, decision)
    log.info(
        "postprocessing for %s: %d step(s) accepted; foreground mean Dice %.4f -> %.4f (%.1f s)",
        selection["selected"],
        len(decision["steps"]),
        decision["result_on_crossval_pre_pp"],
        decision["result_on_crossval_post_pp"],
        time.perf_counter() - start,
    )
    return {
        "selected": selection["selected"],
        "steps": decision["steps"],
        "result_on_crossval_pre_pp": decision["result_on_crossval_pre_pp"],
        "result_on_crossval_post_pp": decision["result_on_crossval_post_pp"],
        "output": str(output_path),
    }


decide_postprocessing = postprocess
"""The name :func:`postprocess` had before the entry functions moved to :mod:`nnsnake.steps`."""
