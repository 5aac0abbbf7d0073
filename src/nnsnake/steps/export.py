"""``nnsnake export``: hand a finished model to someone else (docs/architecture.md, "Model bundle").

Two formats. ``nnsnake`` (default) writes one self-describing zip (:mod:`nnsnake.inference.bundles`): the
selected candidate's fold weights (with ``all_candidates`` every trained candidate's), their plans, dataset.json,
the selection and postprocessing decisions, the cross-validation summaries and a ``metadata.json`` with versions,
dataset, licence, training budget, date and the SHA-256 of every file; ``nnsnake predict -m model.zip`` runs it.
``nnunet`` writes nnU-Net's trained-model layout (``DatasetXXX_Name/nnUNetTrainer__<plans>__<configuration>/``
with ``checkpoint_final.pth`` per fold, ``inference_information.json`` and the postprocessing files) as a folder
or zip, which ``nnUNetv2_predict`` and ``nnUNetv2_install_pretrained_model_from_zip`` accept. Both take the
model from :func:`nnsnake.steps.predict._nnsnake_model`, the same reader prediction uses, so they export what
``nnsnake predict -m results/<DS>`` would run.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import EvaluationError
from ..jsonio import atomic_open, dumps, read_json, write_json
from ._common import (
    BOOTSTRAP_FILE,
    POSTPROCESSING_FILE,
    SELECTION_FILE,
    SUMMARY_FILE,
    PathLike,
    log,
)
from .predict import _nnsnake_model, _Stage

FORMATS = ("nnsnake", "nnunet")
NNUNET_TRAINER = (
    "nnUNetTrainer"  # the trainer nnU-Net builds PlainConvUNet / ResidualEncoderUNet with, as planned
)
_NNUNET_DATASET = re.compile(r"Dataset\d{3}_[A-Za-z0-9_\-.]+")


def export_model(
    results_dir: PathLike,
    output: PathLike,
    *,
    format: str = "nnsnake",
    all_candidates: bool = False,
    licence: str | None = None,
    folds: Sequence[int | str] | None = None,
) -> dict[str, Any]:
    """Export the model of a finished results folder to ``output`` (a zip, or for ``format="nnunet"`` also a
    folder used as ``nnUNet_results``); returns what was written. ``folds`` default: the cross-validated folds
    selection.json records."""
    if format not in FORMATS:
        raise EvaluationError(f"export format {format!r}: use one of {', '.join(FORMATS)}")
    if format == "nnunet":
        if all_candidates or licence is not None:
            log.warning(
                "--all and --licence apply to nnsnake bundles; the nnU-Net layout has no place for them"
            )
        return export_nnunet(results_dir, output, folds=folds)
    return export_bundle(results_dir, output, all_candidates=all_candidates, licence=licence, folds=folds)


# --------------------------------------------------------------------------------------------------------------
# nnsnake bundles


def _candidate_members(name: str, bootstrap: Mapping[str, Any]) -> list[str]:
    from ..selection import candidate_members

    recorded = (bootstrap.get("candidates") or {}).get(name, {}).get("members")
    return list(recorded) if recorded else list(candidate_members(name))


def _candidate_stages(
    results: Path, selection: Mapping[str, Any], name: str, members: list[str], folds: list[str]
) -> list[_Stage] | None:
    """The stages of a candidate that is not the selected one, as :func:`_nnsnake_model` reads them were it
    selected (it is asked through a view of the results folder whose selection.json names the candidate, so the
    results layout stays its business); None when a fold of it was never trained."""
    with tempfile.TemporaryDirectory(prefix="nnsnake_candidate_") as view:
        overlay = Path(view)
        for entry in results.iterdir():
            if entry.name != SELECTION_FILE:
                (overlay / entry.name).symlink_to(entry.resolve())
        write_json(overlay / SELECTION_FILE, {**selection, "selected": name, "members": members})
        try:
            model = _nnsnake_model(overlay, folds, "final", postprocess=False)
        except EvaluationError as exc:
            log.warning("candidate %s is left out: %s", name, exc)
            return None
        return [
            _Stage(s.name, s.configuration, s.plans, [p.resolve() for p in s.checkpoints], s.previous)
            for s in model.stages
        ]


def _training_record(stage: _Stage, folds: Sequence[str]) -> dict[str, Any]:
    """The training budget of a stage's folds as their checkpoints and logs record it."""
    from ..inference import load_checkpoint

    record: dict[str, Any] = {}
    for fold, path in zip(folds, stage.checkpoints, strict=True):
        init = load_checkpoint(path).get("init") or {}
        entry = {
            "epochs_planned": init.get("epochs_planned"),
            "epochs_trained": int(init["epoch"]) + 1 if init.get("epoch") is not None else None,
            "ema_pseudo_dice": init.get("ema_pseudo_dice"),
        }
        log_file = path.parent / "log.json"
        if log_file.is_file():
            history = read_json(log_file)
            entry["train_seconds"] = round(sum(float(e.get("epoch_time_s") or 0.0) for e in history), 1)
        record[fold] = entry
    return record


def export_bundle(
    results_dir: PathLike,
    output: PathLike,
    *,
    all_candidates: bool = False,
    licence: str | None = None,
    folds: Sequence[int | str] | None = None,
) -> dict[str, Any]:
    """Write the selected candidate (``all_candidates``: every trained candidate too) as an nnsnake bundle."""
    import torch

    from .. import __version__
    from ..inference.bundles import write_bundle

    results = Path(results_dir)
    model = _nnsnake_model(results, folds, "final", postprocess=True)
    selection = read_json(results / SELECTION_FILE)
    candidates: dict[str, dict[str, Any]] = {
        model.selected: {"members": model.members, "stages": [s.name for s in model.stages]}
    }
    stages = {s.name: s for s in model.stages}
    if all_candidates:
        bootstrap = read_json(results / BOOTSTRAP_FILE) if (results / BOOTSTRAP_FILE).is_file() else {}
        for name in selection.get("candidates", {}):
            if name in candidates:
                continue
            members = _candidate_members(name, bootstrap)
            found = _candidate_stages(results, selection, name, members, model.folds)
            if found is not None:
                candidates[name] = {"members": members, "stages": [s.name for s in found]}
                for stage in found:
                    stages.setdefault(stage.name, stage)

    files: dict[str, Path | bytes] = {}
    plans_members: dict[str, str] = {}  # plans JSON text -> member name
    stage_records = {}
    for name, stage in stages.items():
        text = dumps(stage.plans)
        if text not in plans_members:
            base = str(stage.plans.get("plans_name") or "plans")
            member = f"plans/{base}.json"
            while member in files:
                member = f"plans/{base}_{len(plans_members)}.json"
            plans_members[text] = member
            files[member] = text.encode()
        checkpoints = {}
        for fold, path in zip(model.folds, stage.checkpoints, strict=True):
            checkpoints[fold] = f"weights/{name}/fold_{fold}/{path.name}"
            files[checkpoints[fold]] = path
            if (path.parent / "log.json").is_file():
                files[f"weights/{name}/fold_{fold}/log.json"] = path.parent / "log.json"
        stage_records[name] = {
            "configuration": stage.configuration,
            "plans": plans_members[text],
            "previous": stage.previous,
            "checkpoints": checkpoints,
        }
    files["dataset.json"] = dumps(model.dataset_json).encode()
    files[SELECTION_FILE] = results / SELECTION_FILE
    files[POSTPROCESSING_FILE] = results / POSTPROCESSING_FILE
    for optional in (BOOTSTRAP_FILE, "fingerprint.json", "splits.json"):
        if (results / optional).is_file():
            files[optional] = results / optional
    summaries = _crossval_summaries(results, selection, candidates)
    for name, path in summaries.items():
        files[f"crossval/{name}/{SUMMARY_FILE}"] = path

    scores = selection.get("candidates", {})
    metadata = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "nnsnake_version": __version__,
        "torch_version": str(torch.__version__),
        "dataset_name": model.stages[0].plans.get("dataset_name") or model.dataset_json.get("name"),
        "licence": licence,
        "training": {name: _training_record(stage, model.folds) for name, stage in stages.items()},
        "cross_validation": {
            name: {
                **{k: scores.get(name, {}).get(k) for k in ("score", "ci_low", "ci_high", "p_best")},
                "summary": f"crossval/{name}/{SUMMARY_FILE}" if name in summaries else None,
            }
            for name in candidates
        },
        "selection": {
            k: selection.get(k) for k in ("selected", "members", "is_ensemble", "score", "nnunet_choice")
        },
        "postprocessing_steps": model.decision["steps"] if model.decision is not None else [],
        "model": {
            "selected": model.selected,
            "folds": model.folds,
            "candidates": candidates,
            "stages": stage_records,
            "dataset_json": "dataset.json",
            "postprocessing": POSTPROCESSING_FILE,
        },
    }
    written = write_bundle(output, files, metadata)
    size = Path(output).stat().st_size
    log.info(
        "exported %s (%d candidate(s), folds %s) to %s: %d files, %.1f MB",
        model.selected,
        len(candidates),
        ", ".join(model.folds),
        output,
        len(written["files"]) + 1,
        size / 1e6,
    )
    return {
        "output": str(output),
        "format": "nnsnake",
        "selected": model.selected,
        "candidates": list(candidates),
    }


def _crossval_summaries(
    results: Path, selection: Mapping[str, Any], candidates: Mapping[str, Any]
) -> dict[str, Path]:
    """The cross-validation summary.json of each exported candidate that has one."""
    found = {}
    for name in candidates:
        places = [results / "crossval" / name / SUMMARY_FILE]
        if name == selection.get("selected") and selection.get("crossval_folder"):
            places.insert(0, results / selection["crossval_folder"] / SUMMARY_FILE)
        path = next((p for p in places if p.is_file()), None)
        if path is not None:
            found[name] = path
    return found


# --------------------------------------------------------------------------------------------------------------
# nnU-Net's trained-model layout


def _nnunet_id(stage: _Stage) -> str:
    return f"{NNUNET_TRAINER}__{stage.plans.get('plans_name') or 'nnUNetPlans'}__{stage.configuration}"


def _nnunet_logging(log_file: Path) -> dict[str, list[Any]]:
    """nnU-Net's per-epoch ``logging`` lists from nnsnake's log.json (what its progress plot reads)."""
    if not log_file.is_file():
        return {}
    history = read_json(log_file)

    def stamp(text: Any) -> float | None:
        return datetime.fromisoformat(str(text)).timestamp() if text else None

    return {
        "mean_fg_dice": [e.get("mean_fg_dice") for e in history],
        "ema_fg_dice": [e.get("ema_pseudo_dice") for e in history],
        "dice_per_class_or_region": [list((e.get("pseudo_dice") or {}).values()) for e in history],
        "train_losses": [e.get("train_loss") for e in history],
        "val_losses": [e.get("val_loss") for e in history],
        "lrs": [e.get("lr") for e in history],
        "epoch_start_timestamps": [stamp(e.get("started_at")) for e in history],
        "epoch_end_timestamps": [stamp(e.get("finished_at")) for e in history],
    }


def _write_nnunet_fold(
    stage: _Stage, fold: str, source: Path, target: Path, dataset_json: Mapping[str, Any]
) -> None:
    """One fold's ``checkpoint_final.pth`` in nnU-Net's layout (weights renamed to DNA's modules)."""
    import torch

    from ..inference import network_from_checkpoint
    from ..inference.checkpoints import load_checkpoint
    from ..inference.nnunet_models import nnunet_checkpoint, nnunet_network_weights

    own = load_checkpoint(source)
    network, init = network_from_checkpoint(own, stage.plans, stage.configuration, dataset_json, "cpu")
    contiguous: dict[int, torch.Tensor] = {}  # aliases keep sharing one tensor (stored once)
    weights = {
        k: contiguous.setdefault(id(v), v.detach().contiguous())
        for k, v in nnunet_network_weights(network).items()
    }
    epoch = init.get("epoch")
    checkpoint = nnunet_checkpoint(
        weights,
        plans=stage.plans,
        configuration=stage.configuration,
        dataset_json=dataset_json,
        fold=fold,
        mirror_axes=init.get("inference_allowed_mirroring_axes"),
        epoch=int(epoch) + 1 if epoch is not None else 0,
        trainer_name=NNUNET_TRAINER,
        logging=_nnunet_logging(source.parent / "log.json"),
        best_ema=init.get("ema_pseudo_dice"),
    )
    target.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, target / "checkpoint_final.pth")
    if (source.parent / "progress.png").is_file():
        shutil.copy2(source.parent / "progress.png", target / "progress.png")


def _nnunet_postprocessing(folder: Path, decision: Mapping[str, Any], summary: Path | None) -> None:
    from ..inference.nnunet_models import nnunet_postprocessing_json, nnunet_postprocessing_pickle

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "postprocessing.json", nnunet_postprocessing_json(decision))
    (folder / "postprocessing.pkl").write_bytes(nnunet_postprocessing_pickle(decision))
    if summary is not None:
        shutil.copy2(summary, folder / SUMMARY_FILE)


def export_nnunet(
    results_dir: PathLike, output: PathLike, folds: Sequence[int | str] | None = None
) -> dict[str, Any]:
    """Write the selected candidate in nnU-Net's trained-model layout, under ``DatasetXXX_Name/``.

    Per stage (a cascade's previous stage included) ``nnUNetTrainer__<plans_name>__<configuration>/`` with
    plans.json, dataset.json, dataset_fingerprint.json and ``fold_<k>/checkpoint_final.pth`` (+ progress.png);
    the selected model's (or ensemble's, under ``ensembles/``) ``postprocessing.json`` and ``.pkl`` and
    cross-validation summary; ``inference_information.json`` as find_best_configuration writes it. ``output``
    ending in ``.zip`` becomes a zip (paths relative to ``nnUNet_results``, for
    ``nnUNetv2_install_pretrained_model_from_zip``), anything else a folder used as ``nnUNet_results``.
    """
    results, output = Path(results_dir), Path(output)
    model = _nnsnake_model(results, folds, "final", postprocess=True)
    selection = read_json(results / SELECTION_FILE)
    dataset_name = str(model.stages[0].plans.get("dataset_name") or "")
    if not _NNUNET_DATASET.fullmatch(dataset_name):
        raise EvaluationError(
            f"{results}: dataset name {dataset_name!r} is not nnU-Net's DatasetXXX_Name (three digits), which "
            "nnUNetv2_predict -d needs; name the raw dataset folder that way and rerun the workflow"
        )
    bad_folds = [f for f in model.folds if not f.isdigit() and f != "all"]
    if bad_folds:
        raise EvaluationError(f"folds {bad_folds}: nnU-Net folds are integers or 'all'")
    fold_tag = "_".join(model.folds)
    fingerprint = results / "fingerprint.json"
    with tempfile.TemporaryDirectory(prefix=".nnsnake_export_", dir=_staging_parent(output)) as staging:
        root = Path(staging) / dataset_name
        ids = {}
        for stage in model.stages:
            ids[stage.name] = _nnunet_id(stage)
            folder = root / ids[stage.name]
            folder.mkdir(parents=True)
            write_json(folder / "plans.json", stage.plans)
            write_json(folder / "dataset.json", model.dataset_json)
            if fingerprint.is_file():
                shutil.copy2(fingerprint, folder / "dataset_fingerprint.json")
            for fold, path in zip(model.folds, stage.checkpoints, strict=True):
                _write_nnunet_fold(stage, fold, path, folder / f"fold_{fold}", model.dataset_json)
        summary_dir = results / str(selection.get("crossval_folder") or f"crossval/{model.selected}")
        summary = summary_dir / SUMMARY_FILE if (summary_dir / SUMMARY_FILE).is_file() else None
        member_ids = [ids[m] for m in model.members]
        if len(member_ids) == 1:
            pp_folder = root / member_ids[0] / f"crossval_results_folds_{fold_tag}"
        else:
            pp_folder = root / "ensembles" / ("ensemble___" + "___".join(member_ids) + f"___{fold_tag}")
        decision = model.decision or {"steps": []}
        _nnunet_postprocessing(pp_folder, decision, summary)
        information = _nnunet_inference_information(
            selection,
            model.members,
            ids,
            model.folds,
            dataset_name,
            pp_folder.relative_to(root.parent),
            decision,
        )
        information["considered_models"] = [
            {"plans": s.plans.get("plans_name"), "configuration": s.configuration, "trainer": NNUNET_TRAINER}
            for s in model.stages
            if s.name in model.members
        ]
        write_json(root / "inference_information.json", information)
        if output.suffix == ".zip":
            _zip_folder(root.parent, output)
        else:
            target = output / dataset_name
            if target.exists():
                raise EvaluationError(f"{target} exists; remove it or export to another folder")
            output.mkdir(parents=True, exist_ok=True)
            shutil.move(str(root), str(target))
    log.info("exported %s in nnU-Net's layout to %s (%s)", model.selected, output, ", ".join(member_ids))
    return {"output": str(output), "format": "nnunet", "selected": model.selected, "models": member_ids}


def _staging_parent(output: Path) -> Path:
    """A folder on the output's file system for the staging folder (the final move stays a cheap rename)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.parent


def _zip_folder(folder: Path, output: Path) -> None:
    """Every file under ``folder`` into the zip ``output`` (names relative to ``folder``), atomically."""
    with atomic_open(output) as fh, zipfile.ZipFile(fh, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                compression = zipfile.ZIP_STORED if path.suffix in (".pth", ".png") else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(folder).as_posix(), compress_type=compression)


def _nnunet_inference_information(
    selection: Mapping[str, Any],
    members: Sequence[str],
    ids: Mapping[str, str],
    folds: Sequence[str],
    dataset_name: str,
    pp_folder: Path,
    decision: Mapping[str, Any],
) -> dict[str, Any]:
    """``inference_information.json`` with nnU-Net's ids (``nnUNetTrainer__<plans>__<configuration>``,
    ``ensemble___<id>___<id>___<folds>``); ``postprocessing_file`` relative to ``nnUNet_results``."""
    from ..selection import candidate_members

    fold_tag = "_".join(folds)

    def nnunet_name(name: str) -> str:
        parts = candidate_members(name)
        if not all(p in ids for p in parts):
            return name
        if len(parts) == 1:
            return ids[parts[0]]
        return "ensemble___" + "___".join(ids[p] for p in parts) + f"___{fold_tag}"

    pp_file = (pp_folder / "postprocessing.pkl").as_posix()
    some_member = ids[members[0]]
    return {
        "dataset_name_or_id": dataset_name,
        "folds": [f if f == "all" else int(f) for f in folds],
        "ensembling_allowed": len(members) > 1 or bool(selection.get("is_ensemble")),
        "all_results": {nnunet_name(k): v for k, v in (selection.get("all_results") or {}).items()},
        "best_model_or_ensemble": {
            "result_on_crossval_pre_pp": decision.get("result_on_crossval_pre_pp", selection.get("score")),
            "result_on_crossval_post_pp": decision.get("result_on_crossval_post_pp", selection.get("score")),
            "postprocessing_file": pp_file,
            "some_plans_file": f"{dataset_name}/{some_member}/plans.json",
            "selected_model_or_models": [
                {
                    "configuration": ids[m].split("__")[2],
                    "trainer": NNUNET_TRAINER,
                    "plans_identifier": ids[m].split("__")[1],
                }
                for m in members
            ],
        },
        "exported_by": "nnsnake",
    }
