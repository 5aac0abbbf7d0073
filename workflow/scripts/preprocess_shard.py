from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.preprocess_shard(
    snakemake.params.dataset,
    snakemake.input.plans,
    snakemake.wildcards.configuration,
    snakemake.output[0],
    shard=int(snakemake.wildcards.shard),
    shards=int(snakemake.wildcards.shards),
    processes=snakemake.threads,
    store=snakemake.params.store,
)
steps.finish_job_process()
