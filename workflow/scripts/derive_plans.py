from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.derive_plans(snakemake.input.plans, snakemake.params.entries, snakemake.output[0])
