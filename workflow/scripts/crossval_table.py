from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.crossval_table(
    snakemake.params.candidates,
    snakemake.input.bootstrap,
    snakemake.input.dataset_json,
    snakemake.output.html,
    snakemake.output.csv,
)
