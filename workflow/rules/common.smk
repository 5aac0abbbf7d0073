# Configuration, paths and input functions shared by every rule.
import json
from pathlib import Path

import yaml
from snakemake.utils import update_config, validate

from nnsnake.dataset import list_raw_files


def typed_scalars(value):
    """--config parses nested values with YAML's BaseLoader (all strings): give them their YAML types back."""
    if isinstance(value, dict):
        return {k: typed_scalars(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed_scalars(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return parsed if isinstance(parsed, (int, float, bool, type(None))) else value
    return value


def apply_dataset_defaults(config):
    """Merge the dataset folder's own nnsnake.yaml (if any) under the command line's --config values.

    A dataset may ship settings that suit it (the embedded demo sets a tiny training budget); values given
    with --config still win, and datasets without the file get nnsnake's (= nnU-Net's) defaults.
    """
    defaults_file = Path(config.get("dataset", "")) / "nnsnake.yaml"
    if defaults_file.is_file():
        with open(defaults_file) as fh:
            update_config(config, yaml.safe_load(fh) or {})
    update_config(config, typed_scalars(workflow.config_settings.overwrite_config or {}))


apply_dataset_defaults(config)
validate(config, schema="../schemas/config.schema.yaml")

DATASET_DIR = Path(config["dataset"])
DATASET = DATASET_DIR.name
RESULTS = f"{config['results']}/{DATASET}"
WORK = f"{config['work']}/{DATASET}"
LOGS = f"logs/{DATASET}"
CONDA_ENV = "../../envs/nnsnake.yaml"


def raw_training_files(wildcards):
    """dataset.json and every file of imagesTr/ and labelsTr/: editing any of them reruns verification."""
    return list_raw_files(DATASET_DIR)


def dataset_folder_of_json(wildcards, input):
    return str(Path(input.dataset_json).parent)


def results_dir_of_selection(wildcards, input):
    return str(Path(input.selection).parent)


def user_splits_file(wildcards):
    """The user's splits_final.json: config splits_file, else one shipped in the dataset folder, else none."""
    if config["splits_file"]:
        return [config["splits_file"]]
    shipped = DATASET_DIR / "splits_final.json"
    return [str(shipped)] if shipped.exists() else []


def planned_configurations(wildcards):
    """Configurations to run: those the plan contains (checkpoint), restricted to config 'configurations'."""
    with open(checkpoints.plan.get().output[0]) as fh:
        planned = list(json.load(fh)["configurations"])
    wanted = config["configurations"] or planned
    return [c for c in planned if c in wanted]


def preprocessed_configuration(configuration):
    """The configuration whose preprocessed data a configuration uses (the cascade reuses 3d_fullres)."""
    return "3d_fullres" if configuration == "3d_cascade_fullres" else configuration


def preprocessed_manifest(wildcards):
    return f"{RESULTS}/preprocessed/{preprocessed_configuration(wildcards.configuration)}/manifest.json"


def training_settings(wildcards):
    """The training section merged with this configuration's overrides: a change reruns only its trainings."""
    return config["training"] | config["training_per_configuration"].get(wildcards.configuration, {})


def trained_configurations(wildcards):
    """Configurations whose folds are trained and cross-validated: the planned ones, restricted by config."""
    return planned_configurations(wildcards)


def split_folds():
    """Every fold of the splits: the cascade trains on the previous stage's predictions of all training cases,
    each from the fold that held it out, so all of that stage's folds are needed whatever config 'folds' says.
    """
    for path in user_splits_file(None):
        try:
            with open(path) as fh:
                return list(range(len(json.load(fh))))
        except (OSError, ValueError, TypeError):
            pass  # the splits rule reports what is wrong with the file
    return list(range(5))


def previous_stage_predictions(configuration, folds):
    """Folders of a cascade stage's previous-stage (3d_lowres) out-of-fold predictions, one per fold."""
    if configuration != "3d_cascade_fullres":
        return []
    return [f"{RESULTS}/training/3d_lowres/fold_{fold}/predicted_next_stage" for fold in folds]


def previous_stage_for_training(wildcards):
    return previous_stage_predictions(wildcards.configuration, split_folds())


def previous_stage_for_validation(wildcards):
    """A fold's validation cases are the lowres fold's validation cases: only that fold's predictions."""
    return previous_stage_predictions(wildcards.configuration, [wildcards.fold])


CANDIDATE_ORDER = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]


def candidate_summaries(wildcards):
    """Cross-validation summary of every candidate: each trained configuration and (optionally) every pair."""
    configurations = sorted(trained_configurations(wildcards), key=CANDIDATE_ORDER.index)
    candidates = {c: f"{RESULTS}/crossval/{c}/summary.json" for c in configurations}
    if config["selection"]["ensembles"]:
        for i, first in enumerate(configurations):
            for second in configurations[i + 1 :]:
                name = f"ensemble_{first}+{second}"
                candidates[name] = f"{RESULTS}/crossval/{name}/summary.json"
    return candidates


def all_trained_models(wildcards):
    """Every fold model of every trained configuration (prediction loads those of the selected candidate)."""
    return {
        f"model_{c}_{fold}": f"{RESULTS}/training/{c}/fold_{fold}/model_final.pt"
        for c in trained_configurations(wildcards)
        for fold in config["folds"]
    }


def prediction_input_sets():
    """Folders of new images to segment: config prediction.input_sets, else the dataset's imagesTs if present."""
    sets = config["prediction"]["input_sets"]
    if sets is None:
        shipped = DATASET_DIR / "imagesTs"
        sets = {"imagesTs": str(shipped)} if shipped.is_dir() else {}
    return sets


def prediction_input_dir(wildcards):
    return prediction_input_sets()[wildcards.input_set]


def prediction_input_files(wildcards):
    folder = Path(prediction_input_dir(wildcards))
    return sorted(str(p) for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def final_outputs(wildcards):
    configurations = sorted({preprocessed_configuration(c) for c in planned_configurations(wildcards)})
    return (
        [
            f"{RESULTS}/verification.json",
            f"{RESULTS}/fingerprint.json",
            f"{RESULTS}/plans.json",
            f"{RESULTS}/splits.json",
        ]
        + [f"{RESULTS}/preprocessed/{c}/manifest.json" for c in configurations]
        + expand(
            f"{RESULTS}/training/{{configuration}}/fold_{{fold}}/model_final.pt",
            configuration=trained_configurations(wildcards),
            fold=config["folds"],
        )
        + [f"{RESULTS}/selection.json", f"{RESULTS}/postprocessing.json"]
        + [f"{RESULTS}/predictions/{name}/prediction.json" for name in prediction_input_sets()]
        + [f"{RESULTS}/report/crossval.html", f"{RESULTS}/report/postprocessing.html"]
    )
