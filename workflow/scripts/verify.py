from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.verify(
    snakemake.params.dataset,
    snakemake.output.report,
    processes=snakemake.threads,
    case_fingerprints=snakemake.output.case_fingerprints,
)
steps.finish_job_process()
