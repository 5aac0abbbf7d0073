from pathlib import Path

from nnsnake import steps
from nnsnake.training import train_fold_from_files

steps.setup_logging(snakemake.log[0])
settings = dict(
    snakemake.params.settings, threads=snakemake.threads, gpu_lock_dir=snakemake.params.gpu_lock_dir
)
train_fold_from_files(
    Path(snakemake.input.preprocessed).parent,
    snakemake.input.plans,
    snakemake.wildcards.configuration,
    snakemake.input.dataset_json,
    snakemake.input.splits,
    snakemake.wildcards.fold,
    Path(snakemake.output.model).parent,
    snakemake.params.state_dir,
    settings,
    previous_stage_dir=list(snakemake.input.previous_stage) or None,
)
