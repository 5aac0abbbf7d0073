from pathlib import Path

from nnsnake import steps
from nnsnake.evaluation import ensemble_crossval

steps.setup_logging(snakemake.log[0])
ensemble_crossval(
    [Path(snakemake.input.first).parent, Path(snakemake.input.second).parent],
    snakemake.params.dataset,
    Path(snakemake.output[0]).parent,
    num_processes=snakemake.threads,
)
