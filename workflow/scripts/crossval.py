from pathlib import Path

from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.crossval(
    [Path(summary).parent for summary in snakemake.input.folds],
    snakemake.params.dataset,
    Path(snakemake.output[0]).parent,
    splits_path=snakemake.input.splits,
    processes=snakemake.threads,
)
steps.finish_job_process()
