from nnsnake import steps
from nnsnake.evaluation import decide_postprocessing

steps.setup_logging(snakemake.log[0])
decide_postprocessing(
    snakemake.input.selection, snakemake.params.dataset, snakemake.output[0], num_processes=snakemake.threads
)
