# Configuration, paths, wildcard constraints and input functions shared by every rule.
import copy
import json
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import update_config, validate

from nnsnake.dataset import list_raw_files

CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]


wildcard_constraints:
    configuration="|".join(CONFIGURATIONS),
    first="|".join(CONFIGURATIONS),
    second="|".join(CONFIGURATIONS),
    fold=r"\d+|all",
    input_set=r"[^/]+",


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


# Renamed keys (old -> new) of the training section and of each training_per_configuration entry; the old names
# are accepted for one release with a warning (see the glossary in CONTRIBUTING.md).
DEPRECATED_TRAINING_KEYS = {"amp": "autocast", "num_workers": "workers"}


def modernized(layer, source):
    """A copy of one config layer (a config file, the dataset's nnsnake.yaml, the command line) with deprecated
    keys under their new names. Old and new name in the same layer is an error: which one was meant is unclear.
    Between layers the usual precedence applies, whichever name each uses."""
    layer = copy.deepcopy(layer or {})
    sections = [("training", layer.get("training"))]
    per_configuration = layer.get("training_per_configuration")
    if isinstance(per_configuration, dict):
        sections += [(f"training_per_configuration.{c}", s) for c, s in per_configuration.items()]
    for name, section in sections:
        if not isinstance(section, dict):
            continue  # the schema reports it
        for old, new in DEPRECATED_TRAINING_KEYS.items():
            if old not in section:
                continue
            if new in section:
                raise WorkflowError(
                    f"{source}: config {name}.{old} and {name}.{new} are both given; {old} is the deprecated "
                    f"name of {new}: keep only {name}.{new}"
                )
            logger.warning(f"config {name}.{old} is deprecated; use {name}.{new}")
            section[new] = section.pop(old)
        if section.get("autocast") is False:  # YAML 1.1 reads a bare `off` as false
            section["autocast"] = "off"
    inference = layer.get("inference")
    if isinstance(inference, dict) and "autocast" in inference:
        autocast = inference["autocast"]
        if autocast is False:  # a bare `off` in YAML, or the old boolean: the same meaning
            inference["autocast"] = "off"
        elif autocast is None:
            logger.warning("config inference.autocast: null is deprecated; use inference.autocast: auto")
            inference["autocast"] = "auto"
        elif autocast is True:  # fp16 on CUDA, bf16 on the CPU: no single new value means this; kept as it is
            logger.warning(
                "config inference.autocast: true is deprecated; use inference.autocast: fp16 or bf16"
            )
    return layer


def layered_config(config):
    """The config from its layers, each modernized on its own, later layers winning: the workflow's config
    files, the dataset folder's own nnsnake.yaml (if any), then the command line (--configfile, --config).

    A dataset may ship settings that suit it (the embedded demo sets a tiny training budget); values given
    on the command line still win, and datasets without the file get nnsnake's (= nnU-Net's) defaults.
    """
    command_line = typed_scalars(workflow.config_settings.overwrite_config or {})
    command_line_files = {Path(f).resolve() for f in workflow.config_settings.configfiles}
    layered = {}
    workflow_files = [] if workflow.config_settings.replace_workflow_config else workflow.configfiles
    for path in workflow_files:
        if Path(path).resolve() not in command_line_files:
            with open(path) as fh:
                update_config(layered, modernized(yaml.safe_load(fh), str(path)))
    user = modernized(command_line, "--config/--configfile")
    dataset = user.get("dataset", layered.get("dataset", config.get("dataset", "")))
    defaults_file = Path(dataset) / "nnsnake.yaml"
    if defaults_file.is_file():
        with open(defaults_file) as fh:
            update_config(layered, modernized(yaml.safe_load(fh), str(defaults_file)))
    update_config(layered, user)
    config.clear()
    config.update(layered)


layered_config(config)
validate(config, schema="../schemas/config.schema.yaml")

DATASET_DIR = Path(config["dataset"])
DATASET = DATASET_DIR.name
RESULTS = f"{config['results']}/{DATASET}"
WORK = f"{config['work']}/{DATASET}"
LOGS = f"logs/{DATASET}"
DATASET_JSON = str(DATASET_DIR / "dataset.json")
CONDA_ENV = "../envs/nnsnake.yaml"


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


# Rules with wildcards whose jobs only the plan (a checkpoint) decides. `--until` selects jobs already in the DAG
# when Snakemake builds it, before it has resolved the checkpoint, so `--until preprocess` (or train, ...) would
# select nothing and silently run nothing, even when plans.json exists (Snakemake 9.27). The stage targets of
# targets.smk do what they say; this turns the silent no-op into an error that names them.
RULES_AFTER_PLAN = {
    "preprocess",
    "train",
    "validate",
    "validate_lowres",
    "crossval",
    "ensemble_crossval",
    "predict",
}


def plan_checkpoint():
    """The plan job; stops with the stage targets named when `--until` asks for jobs the plan decides."""
    until = set(getattr(workflow.dag_settings, "until", None) or ())
    hidden = sorted(until & RULES_AFTER_PLAN)
    if hidden:
        raise WorkflowError(
            f"--until {' '.join(hidden)} cannot work here: the jobs of {', '.join(hidden)} are decided by the plan "
            "(a checkpoint), which Snakemake resolves after it has chosen the --until jobs, so it would run "
            "nothing. Use the stage targets instead: `snakemake preprocess_all` (verify, fingerprint, plan, "
            "preprocess) or `snakemake train_all` (... and splits, train), or give the output files themselves "
            f"as targets (e.g. {RESULTS}/preprocessed/3d_fullres/manifest.json)."
        )
    return checkpoints.plan.get()


def planned_configurations(wildcards):
    """Configurations to run: those the plan contains (checkpoint), restricted to config 'configurations'."""
    with open(plan_checkpoint().output[0]) as fh:
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


def pretrained_weights_file(wildcards):
    """The weights a configuration's trainings start from (training.pretrained_weights), as an input so that
    Snakemake retrains when the file changes; none without fine-tuning."""
    path = training_settings(wildcards).get("pretrained_weights")
    return [path] if path else []


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


def candidate_summaries(wildcards):
    """Cross-validation summary of every candidate: each trained configuration and (optionally) every pair."""
    configurations = sorted(trained_configurations(wildcards), key=CONFIGURATIONS.index)
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


def preprocessed_manifests(wildcards):
    """The manifest of every preprocessed configuration the planned configurations use (stage preprocess)."""
    configurations = sorted({preprocessed_configuration(c) for c in planned_configurations(wildcards)})
    return [f"{RESULTS}/preprocessed/{c}/manifest.json" for c in configurations]


def trained_models(wildcards):
    """The final model of every fold of every trained configuration (stage train)."""
    return expand(
        f"{RESULTS}/training/{{configuration}}/fold_{{fold}}/model_final.pt",
        configuration=trained_configurations(wildcards),
        fold=config["folds"],
    )


def final_outputs(wildcards):
    return (
        [
            f"{RESULTS}/verification.json",
            f"{RESULTS}/fingerprint.json",
            f"{RESULTS}/plans.json",
            f"{RESULTS}/splits.json",
        ]
        + preprocessed_manifests(wildcards)
        + trained_models(wildcards)
        + [f"{RESULTS}/selection.json", f"{RESULTS}/postprocessing.json"]
        + [f"{RESULTS}/predictions/{name}/prediction.json" for name in prediction_input_sets()]
        + [f"{RESULTS}/report/crossval.html", f"{RESULTS}/report/postprocessing.html"]
    )
