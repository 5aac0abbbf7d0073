from nnsnake import steps

p = snakemake.params
steps.setup_logging(snakemake.log[0])
steps.plan(
    snakemake.input.fingerprint,
    p.dataset,
    snakemake.output[0],
    gpu_memory_target_gb=p.gpu_memory_target_gb,
    overwrite_target_spacing=p.overwrite_target_spacing,
    planner=p.planner,
    transfer_plans_from=p.transfer_plans_from,
)
