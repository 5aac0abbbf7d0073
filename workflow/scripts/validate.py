from pathlib import Path

from nnsnake import steps
from nnsnake.evaluation import validate_fold

steps.setup_logging(snakemake.log[0])
validate_fold(
    Path(snakemake.input.preprocessed).parent,
    snakemake.input.plans,
    snakemake.wildcards.configuration,
    snakemake.params.dataset,
    snakemake.input.splits,
    snakemake.wildcards.fold,
    snakemake.input.model,
    Path(snakemake.output[0]).parent,
    device=snakemake.params.inference["device"],
    mirroring=snakemake.params.inference["mirroring"],
    step_size=snakemake.params.inference["step_size"],
    num_threads=snakemake.threads,
)
