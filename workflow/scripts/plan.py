from nnsnake import steps

steps.setup_logging(snakemake.log[0])
steps.plan(
    snakemake.input.fingerprint,
    snakemake.params.dataset,
    snakemake.output[0],
    gpu_memory_target_gb=snakemake.params.gpu_memory_target_gb,
    overwrite_target_spacing=snakemake.params.overwrite_target_spacing,
)
