from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.merge_preprocess_shards(snakemake.input.shards, snakemake.output[0])
steps.finish_job_process()
