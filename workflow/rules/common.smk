# Configuration, paths and input functions shared by every rule.
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


def final_outputs(wildcards):
    return [
        f"{RESULTS}/verification.json",
        f"{RESULTS}/fingerprint.json",
        f"{RESULTS}/plans.json",
        f"{RESULTS}/splits.json",
    ]
