from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.postprocess(
    snakemake.input.selection, snakemake.params.dataset, snakemake.output[0], processes=snakemake.threads
)
steps.finish_job_process()
