from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.fingerprint(
    snakemake.params.dataset,
    snakemake.output[0],
    processes=snakemake.threads,
    case_fingerprints=snakemake.input.case_fingerprints,
)
