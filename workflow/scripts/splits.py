from nnsnake import steps

steps.setup_logging(snakemake.log[0])
user_splits = snakemake.input.user_splits
steps.splits(snakemake.input.verification, snakemake.output[0], user_splits[0] if user_splits else None)
