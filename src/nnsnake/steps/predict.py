"""predict[input set] and ``nnsnake predict``: segment a folder of new images (docs/method.md §9, §15).

The model comes from an nnsnake results folder (the selected candidate: a configuration or an ensemble, a
cascade with its previous stage, all its folds and the postprocessing decision) or from an nnU-Net trained-model
folder (one configuration, its folds, the checkpoint chosen; read without running code). Both become one
:class:`_Model`, which nnsnake's own preprocessing, sliding window and export run: an ensemble's members'
probabilities are averaged, the postprocessing decision is applied and every case is written with its input's
exact geometry. Everything that can be checked (model folder, model files, the whole input folder) is checked
before anything is predicted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..deprecation import renamed_keywords
from ..errors import EvaluationError, ModelFolderError, PredictionInputError
from ..jsonio import read_json, write_json
from ..parallel import process_pool
from ._common import (
    PLANS_FILE,
    POSTPROCESSING_FILE,
    PREDICTION_RECORD,
    SELECTION_FILE,
    WORK_FOLDER,
    PathLike,
    companions,
    configuration_of,
    inference_settings,
    log,
)
from .crossval import ensemble_segmentation

if TYPE_CHECKING:
    from ..inference import InferenceSettings
    from ..labels import LabelModel


@renamed_keywords(num_processes="processes")
def verify_prediction_inputs(
    input_dir: PathLike, dataset_json: Mapping[str, Any], processes: int = 1
) -> dict[str, list[Path]]:
    """Check a folder of new images completely before anything is predicted; ``{case: channel files}``.

    Every file must be named ``{CASE}_{XXXX}{file_ending}`` with the model's file ending; every case needs exactly
    the channels of dataset.json; every file must be readable, finite, and the channels of a case must share
    shape, spacing, origin and direction. All problems are reported at once (:class:`PredictionInputError`),
    each naming its file.
    """
    from ..dataset import discover_cases, verify_case

    folder = Path(input_dir).resolve()
    if not folder.is_dir():
        raise PredictionInputError(f"{input_dir}: input folder does not exist (or is not a folder)")
    layout_json = {
        k: v for k, v in dataset_json.items() if k != "dataset"
    }  # cases come from the folder itself
    cases, problems = discover_cases(
        folder.parent, layout_json, images_folder=folder.name, labels_folder=None
    )
    ending = dataset_json["file_ending"]
    if not cases and not problems:
        raise PredictionInputError(f"{input_dir}: no images named <case>_0000{ending} in this folder")
    jobs: list[tuple[str, Any, list[int]]] = [
        (case_id, files, []) for case_id, files in cases.items() if files.images
    ]  # new images have no label file, so no allowed labels to check
    if processes > 1 and len(jobs) > 1:
        with process_pool(min(processes, len(jobs))) as pool:
            results = list(pool.map(verify_case, *zip(*jobs, strict=True)))
    else:
        results = [verify_case(*job) for job in jobs]
    for case_problems, _warnings in results:
        problems.extend(case_problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PredictionInputError(
            f"input folder {input_dir} has {len(problems)} problem(s); nothing was predicted:\n{lines}"
        )
    return {case_id: list(files.images) for case_id, files in cases.items()}


def _model_files(results_dir: Path, member: str, folds: Sequence[str]) -> list[Path]:
    """A member's fold models: ``training/<configuration>/`` of the default planner's plans, or
    ``<plans_name>/training/<configuration>/`` of another planner's (docs/architecture.md)."""
    from ..selection import DEFAULT_PLANS_NAME, split_member
    from ..training import MODEL_FINAL

    plans_name, configuration = split_member(member)
    root = results_dir if plans_name == DEFAULT_PLANS_NAME else results_dir / plans_name
    return [root / "training" / configuration / f"fold_{f}" / MODEL_FINAL for f in folds]


def _stages_to_run(plans_by_name: Mapping[str, Mapping[str, Any]], members: Sequence[str]) -> list[str]:
    """The members plus the previous stages they need (same plans), each stage after the one it depends on."""
    from ..selection import member_id, split_member

    order: list[str] = []

    def add(member: str, chain: tuple[str, ...]) -> None:
        if member in order:
            return
        if member in chain:
            raise EvaluationError(f"plans: previous_stage of {member} loops ({' -> '.join(chain)})")
        plans_name, configuration = split_member(member)
        previous = configuration_of(plans_by_name[plans_name], configuration).get("previous_stage")
        if previous:
            add(member_id(plans_name, previous), (*chain, member))
        order.append(member)

    for member in members:
        add(member, ())
    return order


def _member_plans(results_dir: Path, plans: dict, members: Sequence[str]) -> dict[str, dict]:
    """The plans of every planner the members come from (the default planner's are ``plans``)."""
    from ..selection import DEFAULT_PLANS_NAME, split_member

    plans_by_name = {DEFAULT_PLANS_NAME: plans}
    for member in members:
        plans_name = split_member(member)[0]
        if plans_name in plans_by_name:
            continue
        path = results_dir / plans_name / PLANS_FILE
        if not path.is_file():
            raise EvaluationError(
                f"{path} is missing: {member} of the selected candidate was trained with the {plans_name} plans; "
                "rerun the workflow's plan step for that planner"
            )
        plans_by_name[plans_name] = read_json(path)
    for member in members:  # derived configurations (inherits_from) come from their own plans files
        plans_name, configuration = split_member(member)
        if configuration in plans_by_name[plans_name]["configurations"]:
            continue
        root = results_dir if plans_name == DEFAULT_PLANS_NAME else results_dir / plans_name
        derived = root / "derived" / configuration / PLANS_FILE
        if not derived.is_file():
            raise EvaluationError(
                f"{member}: configuration {configuration} is neither in the {plans_name} plans nor in {derived}; "
                "rerun the workflow (rule derive_plans)"
            )
        extended = read_json(derived)
        for name, entry in extended["configurations"].items():
            plans_by_name[plans_name]["configurations"].setdefault(name, entry)
    return plans_by_name


def _load_selection(results_dir: Path, postprocess: bool) -> tuple[dict, dict, dict | None, dict]:
    """selection.json, plans.json, postprocessing.json and dataset.json of a results folder, or one error
    listing every missing file."""
    from ..postprocessing import read_decision

    needed = [results_dir / SELECTION_FILE, results_dir / PLANS_FILE]
    if postprocess:
        needed.append(results_dir / POSTPROCESSING_FILE)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        hint = ""
        if not results_dir.is_dir():
            hint = f" ({results_dir} does not exist)"
        elif not (results_dir / PLANS_FILE).is_file():
            found = sorted(p.parent.name for p in results_dir.glob(f"*/{SELECTION_FILE}"))
            hint = f"; did you mean {results_dir / found[0]}?" if found else ""
        raise EvaluationError(
            f"{results_dir} is not a finished nnsnake results folder: missing {', '.join(p.name for p in missing)}"
            f"{hint}. Pass -m results/<DatasetName> after the workflow has run select and postprocess."
        )
    selection = read_json(results_dir / SELECTION_FILE)
    plans = read_json(results_dir / PLANS_FILE)
    decision = read_decision(results_dir / POSTPROCESSING_FILE) if postprocess else None
    if "dataset_json" in selection:
        dataset_json = selection["dataset_json"]
    elif (results_dir / "dataset.json").is_file():
        dataset_json = read_json(results_dir / "dataset.json")
    else:
        raise EvaluationError(
            f"{results_dir / SELECTION_FILE}: holds no dataset_json and there is no "
            f"{results_dir / 'dataset.json'}; rerun the select rule"
        )
    return selection, plans, decision, dataset_json


def _finish_case(
    sources: Sequence[Path],
    targets: Mapping[str, Path],
    labels: LabelModel,
    file_ending: str,
    decision: Mapping[str, Any] | None,
    save_probabilities: bool,
) -> None:
    """Final output of one case: the member's segmentation or the ensemble's, postprocessed, written with the
    input's geometry (probabilities first, the segmentation last)."""
    from ..imageio import read_seg, write_seg
    from ..inference import save_probabilities_npz
    from ..postprocessing import apply_postprocessing

    if len(sources) > 1:
        seg, probabilities, properties = ensemble_segmentation(sources, labels, file_ending)
    else:
        seg_array, properties = read_seg(sources[0])
        seg, probabilities = seg_array[0], None
    if decision is not None:
        seg = apply_postprocessing(seg, decision)
    if save_probabilities:
        member_files = companions(sources[0], file_ending)
        if probabilities is not None:
            save_probabilities_npz(targets["probabilities"], probabilities)
            shutil.copy2(member_files["properties"], targets["properties"])
        else:
            os.replace(member_files["probabilities"], targets["probabilities"])
            os.replace(member_files["properties"], targets["properties"])
    write_seg(seg, targets["segmentation"], properties)
    log.debug("wrote %s", targets["segmentation"])


def _fold_names(
    folds: Sequence[int | str] | None, selection: Mapping[str, Any], results_dir: Path
) -> list[str]:
    """The folds to predict with: those given, else the cross-validated ones that selection.json records."""
    if folds is None:
        folds = selection.get("folds")
    if not folds:
        raise EvaluationError(f"{results_dir / SELECTION_FILE} names no folds; pass the folds to use")
    return [str(f) for f in folds]


def _missing_models(models: Mapping[str, Sequence[Path]], selected: str) -> None:
    absent = [str(p) for paths in models.values() for p in paths if not p.is_file()]
    if absent:
        raise EvaluationError(
            f"{len(absent)} model file(s) of {selected} are missing: "
            f"{', '.join(absent[:6])}; train these folds or choose others with --folds"
        )


def _cases_to_do(
    cases: Mapping[str, list[Path]],
    output_dir: Path,
    file_ending: str,
    save_probabilities: bool,
    continue_prediction: bool,
) -> dict[str, list[Path]]:
    """The cases to predict: all, or with ``continue_prediction`` those whose outputs are not all there."""
    from ..inference import prediction_paths

    todo = dict(cases)
    if continue_prediction:
        for case_id in list(todo):
            paths = prediction_paths(output_dir / case_id, file_ending)
            wanted = [paths["segmentation"]] + ([paths["probabilities"]] if save_probabilities else [])
            if all(p.is_file() for p in wanted):
                del todo[case_id]
    return todo


@dataclass(frozen=True)
class _Stage:
    """One configuration to run with its folds; ``name`` is unique within a model and names its work folder
    (members of different plans may share a configuration name)."""

    name: str
    configuration: str
    plans: Mapping[str, Any]
    checkpoints: list[Path]
    previous: str | None  # the stage whose predictions this cascade stage reads


@dataclass(frozen=True)
class _Model:
    """Everything a prediction runs, whichever kind of folder ``-m`` named: stages in run order, the members
    whose outputs are averaged, the postprocessing decision (None: none)."""

    kind: str
    selected: str
    members: list[str]
    stages: list[_Stage]
    folds: list[str]
    dataset_json: dict[str, Any]
    decision: dict[str, Any] | None
    details: dict[str, Any]  # for prediction.json


def _nnsnake_model(
    results_dir: Path, folds: Sequence[int | str] | None, checkpoint: str, postprocess: bool
) -> _Model:
    """The selected candidate of a finished nnsnake results folder, every model file checked."""
    if checkpoint != "final":
        raise EvaluationError(
            f"--checkpoint {checkpoint}: an nnsnake results folder predicts with model_final.pt; "
            "--checkpoint applies to nnU-Net trained-model folders"
        )
    from ..selection import member_id, split_member

    selection, plans, decision, dataset_json = _load_selection(results_dir, postprocess)
    members = list(selection["members"])
    fold_names = _fold_names(folds, selection, results_dir)
    plans_by_name = _member_plans(results_dir, plans, members)
    names = _stages_to_run(plans_by_name, members)
    models = {stage: _model_files(results_dir, stage, fold_names) for stage in names}
    _missing_models(models, selection["selected"])
    stages = []
    for name in names:
        plans_name, configuration = split_member(name)
        member_plans = plans_by_name[plans_name]
        previous = configuration_of(member_plans, configuration).get("previous_stage")
        stages.append(
            _Stage(
                name,
                configuration,
                member_plans,
                models[name],
                member_id(plans_name, previous) if previous else None,
            )
        )
    return _Model(
        "nnsnake results", selection["selected"], members, stages, fold_names, dataset_json, decision, {}
    )


def _nnunet_model(model_dir: Path, folds: Sequence[int | str] | None, checkpoint: str) -> _Model:
    """An nnU-Net trained-model folder (``nnUNetv2_predict -m`` semantics: one configuration, its folds, no
    postprocessing), every checkpoint scanned for unsafe content; a cascade stage runs the sibling folder of its
    previous stage first (what ``-prev_stage_predictions`` would be given)."""
    from ..inference.nnunet_models import previous_stage_folder, read_nnunet_model_folder

    folder = read_nnunet_model_folder(model_dir, folds, checkpoint)
    previous = previous_stage_folder(folder, folder.folds, checkpoint)
    stages = []
    if previous is not None:
        stages.append(
            _Stage(previous.configuration, previous.configuration, previous.plans, previous.checkpoints, None)
        )
    stage = _Stage(
        folder.configuration,
        folder.configuration,
        folder.plans,
        folder.checkpoints,
        previous.configuration if previous is not None else None,
    )
    stages.append(stage)
    details = {
        "trainer": folder.trainer,
        "plans_name": folder.plans_name,
        "checkpoint": folder.checkpoints[0].name,
    }
    return _Model(
        "nnU-Net trained-model folder",
        folder.name,
        [stage.name],
        stages,
        folder.folds,
        folder.dataset_json,
        None,
        details,
    )


def _nnunet_selection_model(
    dataset_dir: Path, folds: Sequence[int | str] | None, checkpoint: str, postprocess: bool
) -> _Model:
    """An nnU-Net dataset results folder with ``inference_information.json``: the configuration or ensemble
    ``nnUNetv2_find_best_configuration`` selected, with its folds and its postprocessing (from
    ``postprocessing.json``), as its inference instructions run it (predict, ensemble, apply_postprocessing)."""
    from ..inference.nnunet_models import read_inference_information

    selection = read_inference_information(dataset_dir, folds, checkpoint, postprocess)
    stages: list[_Stage] = []
    for member in selection.members:
        previous = selection.previous.get(member.name)
        if previous is not None and all(s.name != previous.name for s in stages):
            stages.append(
                _Stage(previous.name, previous.configuration, previous.plans, previous.checkpoints, None)
            )
        stages.append(
            _Stage(
                member.name,
                member.configuration,
                member.plans,
                member.checkpoints,
                previous.name if previous is not None else None,
            )
        )
    first = selection.members[0]
    details = {
        "trainer": ", ".join(dict.fromkeys(m.trainer for m in selection.members)),
        "plans_name": ", ".join(dict.fromkeys(m.plans_name for m in selection.members)),
        "checkpoint": first.checkpoints[0].name,
        "postprocessing_file": str(selection.postprocessing_file) if selection.postprocessing_file else None,
    }
    decision = {"steps": selection.steps} if selection.steps is not None else None
    return _Model(
        "nnU-Net dataset results folder",
        selection.selected,
        [m.name for m in selection.members],
        stages,
        selection.folds,
        first.dataset_json,
        decision,
        details,
    )


def _bundle_model(
    bundle: Path,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    postprocess: bool,
    scratch: Path,
) -> _Model:
    """A model bundle of ``nnsnake export``: every member verified against its SHA-256 while it is extracted
    into ``scratch``, then the selected candidate as the bundle describes it (stages, plans, fold weights)."""
    from ..inference.bundles import BundleError, extract_bundle
    from ..postprocessing import read_decision

    if checkpoint != "final":
        raise EvaluationError(f"--checkpoint {checkpoint}: a model bundle holds the final weights only")
    metadata = extract_bundle(bundle, scratch)
    model = metadata.get("model") or {}
    try:
        stage_info = model["stages"]
        candidate = model["candidates"][model["selected"]]
        bundle_folds = [str(f) for f in model["folds"]]
        dataset_json = read_json(scratch / model["dataset_json"])
    except (KeyError, TypeError, OSError) as exc:
        raise BundleError(
            f"{bundle}: metadata.json does not describe a model ({exc!r}); export it again"
        ) from None
    fold_names = [str(f) for f in folds] if folds else bundle_folds
    absent = sorted(set(fold_names) - set(bundle_folds))
    if absent:
        raise BundleError(
            f"{bundle}: holds folds {', '.join(bundle_folds)}, not {', '.join(absent)}; choose others with --folds"
        )
    plans_cache: dict[str, dict[str, Any]] = {}
    stages = []
    for name in candidate["stages"]:
        info = stage_info[name]
        plans = plans_cache.setdefault(info["plans"], read_json(scratch / info["plans"]))
        checkpoints = [scratch / info["checkpoints"][f] for f in fold_names]
        stages.append(_Stage(name, info["configuration"], plans, checkpoints, info.get("previous")))
    decision = None
    if postprocess and model.get("postprocessing"):
        decision = read_decision(scratch / model["postprocessing"])
    details = {
        "bundle": str(bundle),
        "bundle_created": metadata.get("created"),
        "licence": metadata.get("licence"),
    }
    return _Model(
        "nnsnake model bundle",
        model["selected"],
        list(candidate["members"]),
        stages,
        fold_names,
        dataset_json,
        decision,
        details,
    )


def _neither_hint(path: Path) -> str:
    """What the folder looks like instead, for the error that says what ``-m`` expects."""
    from ..inference.nnunet_models import looks_like_nnunet_model_folder

    if path.is_file():
        return f" ({path} is a file, and not a zip)"
    if not path.is_dir():
        return f" ({path} does not exist)"
    found = sorted(p.parent.name for p in path.glob(f"*/{SELECTION_FILE}"))
    if found:
        return f"; did you mean {path / found[0]}?"
    models = sorted(p.name for p in path.iterdir() if p.is_dir() and looks_like_nnunet_model_folder(p))
    if models:
        return f"; it holds nnU-Net trained-model folders: did you mean {path / models[0]}?"
    return ""


def _load_model(
    model_dir: Path,
    folds: Sequence[int | str] | None,
    checkpoint: str,
    postprocess: bool,
    scratch: Callable[[], Path] | None = None,
) -> _Model:
    """The model ``-m`` names: a model bundle (a zip from ``nnsnake export``, extracted into the folder
    ``scratch()`` gives), an nnsnake results folder (it has selection.json or plans.json without being an nnU-Net
    model folder), an nnU-Net dataset results folder with inference_information.json, or an nnU-Net
    trained-model folder; anything else gets one error saying what was expected."""
    from ..inference.bundles import is_bundle
    from ..inference.nnunet_models import (
        INFERENCE_INFORMATION,
        MODEL_FOLDER_LAYOUT,
        looks_like_nnunet_model_folder,
    )

    if model_dir.is_file() and zipfile.is_zipfile(model_dir):
        if not is_bundle(model_dir):
            from ..inference.bundles import read_bundle_metadata

            read_bundle_metadata(model_dir)  # raises the error that says what the zip is not
        if scratch is None:
            raise EvaluationError(f"{model_dir}: a model bundle needs a folder to extract into")
        return _bundle_model(model_dir, folds, checkpoint, postprocess, scratch())
    nnunet = model_dir.is_dir() and looks_like_nnunet_model_folder(model_dir)
    if (model_dir / SELECTION_FILE).is_file() or ((model_dir / PLANS_FILE).is_file() and not nnunet):
        return _nnsnake_model(model_dir, folds, checkpoint, postprocess)
    if nnunet:
        return _nnunet_model(model_dir, folds, checkpoint)
    if (model_dir / INFERENCE_INFORMATION).is_file():
        return _nnunet_selection_model(model_dir, folds, checkpoint, postprocess)
    raise ModelFolderError(
        f"{model_dir} is not a finished nnsnake results folder (results/<DatasetName> with {SELECTION_FILE}, "
        f"{PLANS_FILE}, {POSTPROCESSING_FILE}, after the workflow has run select and postprocess), nor an nnU-Net "
        f"trained-model folder ({MODEL_FOLDER_LAYOUT}), nor an nnU-Net dataset results folder "
        f"(nnUNet_results/<Dataset> with {INFERENCE_INFORMATION}), nor a model bundle (a .zip of nnsnake export)"
        f"{_neither_hint(model_dir)}"
    )


def _predict_stages(
    todo: Mapping[str, list[Path]],
    work: Path,
    model: _Model,
    settings: InferenceSettings,
    save_probabilities: bool,
    progress: bool,
) -> None:
    """Run every stage (each configuration with all its folds, a cascade's previous stage first) into ``work``."""
    from ..inference import predict_from_raw

    ensemble = len(model.members) > 1
    for stage in model.stages:
        log.info("%s: %d fold(s) on %s", stage.name, len(stage.checkpoints), settings.device)
        predict_from_raw(
            todo,
            work / stage.name,
            stage.checkpoints,
            stage.plans,
            stage.configuration,
            model.dataset_json,
            settings=settings,
            save_probabilities=stage.name in model.members and (ensemble or save_probabilities),
            previous_stage_dir=work / stage.previous if stage.previous else None,
            progress=progress,
        )


@renamed_keywords(num_processes="processes")
def predict(
    input_dir: PathLike,
    output_dir: PathLike,
    results_dir: PathLike,
    folds: Sequence[int | str] | None = None,
    settings: InferenceSettings | Mapping[str, Any] | None = None,
    *,
    save_probabilities: bool = False,
    continue_prediction: bool = False,
    postprocess: bool = True,
    checkpoint: str = "final",
    processes: int = 1,
    progress: bool = True,
    **legacy: Any,
) -> dict[str, Any]:
    """Segment every case of ``input_dir`` with the model of ``results_dir`` (§9, §15).

    ``results_dir`` is an nnsnake results folder (its selected model or ensemble, ``folds`` default: the
    cross-validated ones, and its postprocessing decision) or an nnU-Net trained-model folder
    ``<Trainer>__<Plans>__<configuration>`` (``folds`` default: every ``fold_<k>`` present, ``fold_all`` excluded;
    ``checkpoint`` ``final`` or ``best``, nnU-Net's ``-chk``; no postprocessing, as ``nnUNetv2_predict``).
    First, before anything is predicted, the model folder and every model file it needs (nnU-Net checkpoints
    scanned for unsafe pickle content) and the whole input folder (:func:`verify_prediction_inputs`) are
    checked. Then each configuration (and a cascade's previous stage, run first and fed in) predicts with all
    its folds (logits averaged over folds), an ensemble's members' probabilities are averaged, the
    postprocessing decision is applied and ``<case><file_ending>`` is written into ``output_dir`` with the
    input's exact geometry (with ``save_probabilities`` also ``<case>.npz`` + ``<case>.json``).
    ``continue_prediction`` skips cases whose outputs exist. ``settings``:
    :class:`~nnsnake.inference.InferenceSettings` or the workflow's ``inference`` mapping (device, mirroring,
    step size, autocast, tiles per pass, threads); the loose keywords ``device``, ``mirroring``, ``step_size``,
    ``autocast``, ``num_threads`` (``legacy``) are deprecated and update it with a warning. ``processes`` worker
    processes check the input folder. Intermediate files live in ``output_dir/.nnsnake_work`` and are removed at
    the end; ``prediction.json`` (what was run) is written last.
    """
    from ..inference import prediction_paths
    from ..labels import LabelModel

    start = time.perf_counter()
    inference = inference_settings("predict", settings, legacy)
    input_path, output_path, results_path = Path(input_dir), Path(output_dir), Path(results_dir)
    if output_path.resolve() == input_path.resolve():
        raise EvaluationError(f"{output_dir}: the output folder must differ from the input folder")
    with contextlib.ExitStack() as resources:
        model = _load_model(
            results_path, folds, checkpoint, postprocess, scratch=lambda: _scratch_folder(resources)
        )
        dataset_json = model.dataset_json
        ending = dataset_json["file_ending"]
        cases = verify_prediction_inputs(input_path, dataset_json, processes)
        todo = _cases_to_do(cases, output_path, ending, save_probabilities, continue_prediction)
        log.info(
            "predicting %d of %d case(s) with %s (%s; folds %s, mirroring %s)%s",
            len(todo),
            len(cases),
            model.selected,
            model.kind,
            ", ".join(model.folds),
            "on" if inference.mirroring else "off",
            f"; {len(cases) - len(todo)} already done" if len(todo) < len(cases) else "",
        )
        labels = LabelModel.from_dataset_json(dataset_json)
        work = output_path / WORK_FOLDER
        device_used = None
        # the device is chosen (and a GPU claimed) before anything is written, so a wrong --device leaves no trace
        with _device_for(inference, bool(todo)) as torch_device:
            output_path.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            try:
                if todo:
                    device_used = str(torch_device)
                    stage_settings = inference.replace(device=device_used)
                    _predict_stages(
                        todo,
                        work,
                        model,
                        stage_settings,
                        save_probabilities=save_probabilities,
                        progress=progress,
                    )
                for case_id in sorted(todo):
                    _finish_case(
                        [work / m / f"{case_id}{ending}" for m in model.members],
                        prediction_paths(output_path / case_id, ending),
                        labels,
                        ending,
                        model.decision,
                        save_probabilities,
                    )
            finally:
                shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - start
        record = {
            "selected": model.selected,
            "model_kind": model.kind,
            **model.details,
            "members": model.members,
            "configurations_run": [stage.name for stage in model.stages],
            "folds": model.folds,
            **_settings_record(inference, device_used),
            "postprocessing_steps": model.decision["steps"] if model.decision is not None else None,
            "results_dir": str(results_path),
            "input_dir": str(input_path),
            "cases": sorted(cases),
            "n_predicted": len(todo),
            "seconds": seconds,
            "seconds_per_case": seconds / len(todo) if todo else None,
        }
        write_json(output_path / PREDICTION_RECORD, record)
        log.info("wrote %d segmentation(s) to %s in %.1f s", len(todo), output_path, seconds)
        return {
            "n_cases": len(cases),
            "n_predicted": len(todo),
            "selected": model.selected,
            "output_dir": str(output_path),
            "seconds": seconds,
        }


def _scratch_folder(resources: contextlib.ExitStack) -> Path:
    """A temporary folder removed when ``resources`` closes (a bundle's extracted files live as long as the
    prediction that reads them)."""
    return Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="nnsnake_bundle_")))


def _settings_record(settings: InferenceSettings, device_used: str | None) -> dict[str, Any]:
    """How the prediction ran, for ``prediction.json`` (``device``: None when nothing needed predicting)."""
    return {
        "mirroring": bool(settings.mirroring),
        "step_size": float(settings.step_size),
        "autocast": settings.autocast,
        "device": device_used,
    }


def _device_for(settings: InferenceSettings, needed: bool) -> contextlib.AbstractContextManager[Any]:
    """The settings' device with a claimed GPU and the thread count set, when there is something to predict."""
    from ..runtime import compute_device

    return compute_device(settings.device, settings.threads) if needed else contextlib.nullcontext()


predict_folder = predict
"""The name :func:`predict` had as ``nnsnake.evaluation.predict_folder`` (the CLI's entry point)."""
