from pathlib import Path

from nnsnake import steps
from nnsnake.evaluation import predict_folder

steps.setup_logging(snakemake.log[0])
predict_folder(
    snakemake.params.input_dir,
    Path(snakemake.output[0]).parent,
    snakemake.params.results_dir,
    folds=snakemake.params.prediction["folds"],
    mirroring=snakemake.params.inference["mirroring"],
    device=snakemake.params.inference["device"],
    step_size=snakemake.params.inference["step_size"],
    save_probabilities=snakemake.params.prediction["save_probabilities"],
    num_threads=snakemake.threads,
    autocast=snakemake.params.inference["autocast"],
)
