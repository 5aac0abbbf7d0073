from pathlib import Path

from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.ensemble_crossval(
    [Path(snakemake.input.first).parent, Path(snakemake.input.second).parent],
    snakemake.params.dataset,
    Path(snakemake.output[0]).parent,
    processes=snakemake.threads,
)
steps.finish_job_process()
