from pathlib import Path

from nnsnake import steps

p = snakemake.params
steps.setup_logging(snakemake.log[0])
steps.predict(
    p.input_dir,
    Path(snakemake.output[0]).parent,
    p.results_dir,
    folds=p.prediction["folds"],
    settings=dict(p.inference, threads=snakemake.threads),
    save_probabilities=p.prediction["save_probabilities"],
)
steps.finish_job_process()
