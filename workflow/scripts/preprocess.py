from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.preprocess(
    snakemake.params.dataset,
    snakemake.input.plans,
    snakemake.wildcards.configuration,
    snakemake.output[0],
    processes=snakemake.threads,
    store=snakemake.params.store,
)
steps.finish_job_process()
