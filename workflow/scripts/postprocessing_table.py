from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.postprocessing_table(snakemake.input.decision, snakemake.input.dataset_json, snakemake.output[0])
