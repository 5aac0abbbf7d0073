# Configuration, paths and input functions shared by every rule.
import json
from pathlib import Path

from snakemake.utils import validate

from nnsnake.dataset import list_raw_files


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


def final_outputs(wildcards):
    configurations = sorted({preprocessed_configuration(c) for c in planned_configurations(wildcards)})
    return [
        f"{RESULTS}/verification.json",
        f"{RESULTS}/fingerprint.json",
        f"{RESULTS}/plans.json",
        f"{RESULTS}/splits.json",
    ] + [f"{RESULTS}/preprocessed/{c}/manifest.json" for c in configurations]
