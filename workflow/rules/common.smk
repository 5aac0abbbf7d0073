# Configuration, paths, wildcard constraints and input functions shared by every rule.
import copy
import json
import re
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import update_config, validate

from nnsnake import steps
from nnsnake.dataset import list_raw_files
from nnsnake.planning import (
    PLANNER_PRESETS,
    get_planner_preset,
    add_extra_configurations,
    preprocessed_data_owner,
    resolve_configuration,
    same_preprocessing,
)
from nnsnake.selection import DEFAULT_PLANS_NAME, ensemble_name, member_id, split_member


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


def preprocess_shards(config):
    """config preprocessing.shards (default 1): the number of jobs each configuration's preprocessing is split
    into. Checked before the schema, whose message would bury the key in a dump of the whole schema."""
    section = config.get("preprocessing")
    shards = section.get("shards", 1) if isinstance(section, dict) else 1
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise WorkflowError(
            f"config preprocessing.shards is {shards!r}: it must be a whole number >= 1, the number of jobs "
            "each configuration's preprocessing is split into (1 = one job, the default)"
        )
    return shards


layered_config(config)
PREPROCESS_SHARDS = preprocess_shards(config)
validate(config, schema="../schemas/config.schema.yaml")

DATASET_DIR = Path(config["dataset"])
DATASET = DATASET_DIR.name
RESULTS = f"{config['results']}/{DATASET}"
WORK = f"{config['work']}/{DATASET}"
LOGS = f"logs/{DATASET}"
DATASET_JSON = str(DATASET_DIR / "dataset.json")
CONDA_ENV = "../envs/nnsnake.yaml"


def run_step(step, log, *args, **kwargs):
    """Run an nnsnake step inside this Snakemake process (the ``run:`` of the light rules, whose work takes less
    than an interpreter's start-up). Locally (profiles/default: force-use-threads) that costs no process; on a
    cluster each is still a job of its own. The step's log records and its error go to the rule's log file."""
    with steps.job_log(log[0]):
        step(*args, **kwargs)


PLANNED_CONFIGURATIONS = ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
# derived configurations (nnU-Net's inherits_from) from config planning.extra_configurations, trained like the others
CONFIGURATIONS = PLANNED_CONFIGURATIONS + list(config["planning"]["extra_configurations"])
# Several planners side by side (config planning.planners): the default planner's results keep their paths
# (results/<DS>/plans.json, training/, crossval/, preprocessed/), another planner's go beside them under its plans
# name (results/<DS>/nnUNetResEncUNetMPlans/plans.json, .../training/...). Rules match both through the
# {planner_dir} wildcard, which is "" for the default planner and "<plans_name>/" for the others.
PLANNER_DIRS = {
    preset.plans_name: ("" if preset.plans_name == DEFAULT_PLANS_NAME else f"{preset.plans_name}/")
    for preset in PLANNER_PRESETS.values()
}


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


wildcard_constraints:
    configuration=_alternatives(CONFIGURATIONS),
    planner_dir=f"(?:|{_alternatives(d for d in PLANNER_DIRS.values() if d)})",
    first=f"(?:(?:{_alternatives(n for n in PLANNER_DIRS if n != DEFAULT_PLANS_NAME)})__)?(?:{_alternatives(CONFIGURATIONS)})",
    second=f"(?:(?:{_alternatives(n for n in PLANNER_DIRS if n != DEFAULT_PLANS_NAME)})__)?(?:{_alternatives(CONFIGURATIONS)})",
    fold=r"\d+|all",
    input_set=r"[^/]+",


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
    "preprocess_shard",
    "train",
    "validate",
    "validate_lowres",
    "crossval",
    "ensemble_crossval",
    "predict",
}


PLANNERS = list(config["planning"]["planners"])
PLANS_NAMES = [get_planner_preset(p).plans_name for p in PLANNERS]
if config["planning"]["transfer_plans_from"] and len(PLANNERS) > 1:
    raise WorkflowError(
        f"config planning.transfer_plans_from takes the architecture from {config['planning']['transfer_plans_from']} "
        f"for the one planner it is planned with, but planning.planners lists {PLANNERS}: keep one planner (the one "
        "whose plans name the transferred plans should carry)"
    )


def transfer_plans_source(wildcards):
    """The plans file of planning.transfer_plans_from, as an input so that an edit of it replans."""
    source = config["planning"]["transfer_plans_from"]
    return [source] if source else []


def plans_root(plans_name):
    """Where a planner's plans, training and cross-validation live: the results folder for the default
    planner's plans, a subfolder named after the plans for the others."""
    return f"{RESULTS}/{PLANNER_DIRS[plans_name]}".rstrip("/")


def plans_name_of(wildcards):
    """The plans name a job's {planner_dir} wildcard stands for (the default planner's when it is empty)."""
    planner_dir = wildcards.get("planner_dir", "")
    return planner_dir.rstrip("/") or DEFAULT_PLANS_NAME


PLANNER_OF_PLANS_NAME = {preset.plans_name: preset.planner for preset in PLANNER_PRESETS.values()}


def planner_of_dir(wildcards):
    """nnU-Net's planner class whose plans a {planner_dir} holds."""
    return PLANNER_OF_PLANS_NAME[plans_name_of(wildcards)]


def gpu_memory_target_gb(wildcards):
    """planning.gpu_memory_target_gb, or the planner preset's own target when it is null."""
    target = config["planning"]["gpu_memory_target_gb"]
    return (
        target if target is not None else get_planner_preset(planner_of_dir(wildcards)).gpu_memory_target_gb
    )


def plan_checkpoint(plans_name=DEFAULT_PLANS_NAME):
    """A planner's plan job (a checkpoint); stops with the stage targets named when `--until` asks for jobs the
    plan decides."""
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
    return checkpoints.plan.get(planner_dir=PLANNER_DIRS[plans_name])


EXTRA_CONFIGURATIONS = config["planning"]["extra_configurations"]


def read_plans(plans_name=DEFAULT_PLANS_NAME):
    """A planner's plans (checkpoint) with the derived configurations of config planning.extra_configurations.

    The derived ones are not written into plans.json: adding or editing one would change plans.json and so
    rerun every training of that planner. Each gets its own plans file instead (rule derive_plans)."""
    with open(plan_checkpoint(plans_name).output[0]) as fh:
        plans = json.load(fh)
    return add_extra_configurations(plans, EXTRA_CONFIGURATIONS)


def all_plans_files():
    """Every planner's plans.json, listed plainly (not through the checkpoint) so that the DAG holds every plan
    job from the start: `--until plan` then builds every planner's plans."""
    return [f"{plans_root(name)}/plans.json" for name in PLANS_NAMES]


def planned_configurations(wildcards, plans_name=DEFAULT_PLANS_NAME):
    """Configurations to run with a planner's plans: those the plan contains (checkpoint), restricted to config
    'configurations'."""
    planned = list(read_plans(plans_name)["configurations"])
    wanted = config["configurations"] or planned
    return [c for c in planned if c in wanted]


def trained_members(wildcards):
    """(plans name, configuration) of every configuration trained and cross-validated, planner by planner in
    config order, each planner's in nnU-Net's order (derived configurations last)."""
    return [
        (plans_name, c)
        for plans_name in PLANS_NAMES
        for c in sorted(planned_configurations(wildcards, plans_name), key=CONFIGURATIONS.index)
    ]


def preprocessed_manifest_of(plans_name, configuration):
    """The preprocessed folder (manifest) whose data a planner's configuration trains on.

    nnU-Net names preprocessed data by data_identifier: a cascade stage or a derived configuration reads its
    parent's data, and the residual-encoder planners' 2d and 3d_fullres data (nnUNetPlans_2d/3d_fullres) is the
    default planner's, so it is preprocessed once, in results/<DS>/preprocessed/.
    """
    plans = read_plans(plans_name)
    identifier = resolve_configuration(plans, configuration).get("data_identifier", "")
    shared_prefix = f"{DEFAULT_PLANS_NAME}_"
    if plans_name != DEFAULT_PLANS_NAME and identifier.startswith(shared_prefix):
        shared = identifier[len(shared_prefix) :]
        default_plans = read_plans(DEFAULT_PLANS_NAME)
        if shared in default_plans["configurations"] and same_preprocessing(
            plans, configuration, default_plans, shared
        ):
            return f"{RESULTS}/preprocessed/{shared}/manifest.json"
    owner = preprocessed_data_owner(plans, configuration)
    return f"{plans_root(plans_name)}/preprocessed/{owner}/manifest.json"


def preprocessed_manifest(wildcards):
    return preprocessed_manifest_of(plans_name_of(wildcards), wildcards.configuration)


def next_stage_manifest(wildcards):
    """The 3d_fullres data a 3d_lowres validation writes the cascade's input for."""
    return preprocessed_manifest_of(plans_name_of(wildcards), "3d_fullres")


def plans_file_of(plans_name, configuration):
    """The plans file a configuration's jobs read: the planner's plans.json, or for a derived configuration
    (planning.extra_configurations) its own derived/<configuration>/plans.json (plans.json plus its entry)."""
    root = plans_root(plans_name)
    if configuration in EXTRA_CONFIGURATIONS:
        return f"{root}/derived/{configuration}/plans.json"
    return f"{root}/plans.json"


def plans_file(wildcards):
    """The plans file of the job's planner and configuration."""
    return plans_file_of(plans_name_of(wildcards), wildcards.configuration)


# Training keys added after results existed, with the values that reproduce the earlier trainings: left out of
# the train rule's settings param while they keep them, so that an upgrade does not report changed params (and
# rerun every training and validation); TrainingSettings has the same defaults.
TRAINING_KEYS_OMITTED_AT_DEFAULT = {
    "loss": "dice_ce",
    "optimizer": "sgd",
    "lr_schedule": "poly",
    "augmentation": "default",
    "deep_supervision": True,
    "oversample_foreground_percent": 0.33,
    "probabilistic_oversampling": False,
    "pretrained_weights": None,
}


def training_settings(wildcards):
    """The training section merged with this configuration's overrides: a change reruns only its trainings."""
    merged = config["training"] | config["training_per_configuration"].get(wildcards.configuration, {})
    return {
        key: value
        for key, value in merged.items()
        if key not in TRAINING_KEYS_OMITTED_AT_DEFAULT or value != TRAINING_KEYS_OMITTED_AT_DEFAULT[key]
    }


def pretrained_weights_file(wildcards):
    """The weights a configuration's trainings start from (training.pretrained_weights), as an input so that
    Snakemake retrains when the file changes; none without fine-tuning."""
    path = training_settings(wildcards).get("pretrained_weights")
    return [path] if path else []


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


def previous_stage_predictions(wildcards, folds):
    """Folders of a cascade stage's previous-stage out-of-fold predictions (same plans), one per fold."""
    plans_name = plans_name_of(wildcards)
    previous = resolve_configuration(read_plans(plans_name), wildcards.configuration).get("previous_stage")
    if not previous:
        return []
    root = plans_root(plans_name)
    return [f"{root}/training/{previous}/fold_{fold}/predicted_next_stage" for fold in folds]


def previous_stage_for_training(wildcards):
    return previous_stage_predictions(wildcards, split_folds())


def previous_stage_for_validation(wildcards):
    """A fold's validation cases are the lowres fold's validation cases: only that fold's predictions. Fold all
    validates every case, each with the out-of-fold prediction its training used (not lowres fold all's)."""
    folds = split_folds() if wildcards.fold == "all" else [wildcards.fold]
    return previous_stage_predictions(wildcards, folds)


def crossval_folds():
    """The folds pooled into the cross-validation and recorded by the selection: config 'folds' without fold
    all, which validates on its own training cases (nnU-Net leaves it out too); fold all alone when it is the only
    fold, so such a run still completes (its scores are then on training data)."""
    folds = [fold for fold in config["folds"] if str(fold) != "all"]
    return folds or ["all"]


def member_summary(member):
    """The cross-validation summary of a trained configuration (a candidate member)."""
    plans_name, configuration = split_member(member)
    return f"{plans_root(plans_name)}/crossval/{configuration}/summary.json"


def candidate_summaries(wildcards):
    """Cross-validation summary of every candidate: each trained configuration of every planner and (optionally)
    every pair of them. Ensembles live in results/<DS>/crossval/ensemble_<a>+<b>/."""
    members = [member_id(p, c) for p, c in trained_members(wildcards)]
    candidates = {m: member_summary(m) for m in members}
    if config["selection"]["ensembles"]:
        for i, first in enumerate(members):
            for second in members[i + 1 :]:
                name = ensemble_name([first, second])
                candidates[name] = f"{RESULTS}/crossval/{name}/summary.json"
    return candidates


def selection_plans(wildcards):
    """Every planner's plans.json, by plans name: select counts each candidate's network parameters from them
    (with the derived configurations of the config)."""
    return {name: f"{plans_root(name)}/plans.json" for name in PLANS_NAMES}


def derivation_chain(configuration):
    """The planning.extra_configurations entries a derived configuration is resolved from (itself, and its
    parents while they are derived too): only these are its derive_plans job's params."""
    chain = {}
    while configuration in EXTRA_CONFIGURATIONS and configuration not in chain:
        chain[configuration] = EXTRA_CONFIGURATIONS[configuration]
        configuration = EXTRA_CONFIGURATIONS[configuration].get("inherits_from")
    return chain


def derived_plans_files(wildcards):
    """The plans files of the trained derived configurations (prediction reads them)."""
    return sorted({plans_file_of(p, c) for p, c in trained_members(wildcards) if c in EXTRA_CONFIGURATIONS})


def model_file(plans_name, configuration, fold):
    return f"{plans_root(plans_name)}/training/{configuration}/fold_{fold}/model_final.pt"


def all_trained_models(wildcards):
    """Every fold model of every trained configuration (prediction loads those of the selected candidate)."""
    return {
        f"model_{member_id(p, c)}_{fold}": model_file(p, c, fold)
        for p, c in trained_members(wildcards)
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
    """The manifest of every preprocessed folder the trained configurations use (stage preprocess)."""
    manifests = {preprocessed_manifest_of(p, c) for p, c in trained_members(wildcards)}
    return sorted(manifests)


def trained_models(wildcards):
    """The final model of every fold of every trained configuration (stage train)."""
    return [model_file(p, c, fold) for p, c in trained_members(wildcards) for fold in config["folds"]]


def final_outputs(wildcards):
    return (
        [
            f"{RESULTS}/verification.json",
            f"{RESULTS}/fingerprint.json",
            *all_plans_files(),
            f"{RESULTS}/splits.json",
        ]
        + preprocessed_manifests(wildcards)
        + trained_models(wildcards)
        + [f"{RESULTS}/selection.json", f"{RESULTS}/postprocessing.json"]
        + [f"{RESULTS}/predictions/{name}/prediction.json" for name in prediction_input_sets()]
        + [f"{RESULTS}/report/crossval.html", f"{RESULTS}/report/postprocessing.html"]
    )
