from pathlib import Path

from nnsnake import steps

i, p, w = snakemake.input, snakemake.params, snakemake.wildcards
steps.setup_logging(snakemake.log[0])
steps.train(
    Path(i.preprocessed).parent,
    i.plans,
    w.configuration,
    i.dataset_json,
    i.splits,
    w.fold,
    Path(snakemake.output.model).parent,
    p.state_dir,
    dict(p.settings, threads=snakemake.threads, gpu_lock_dir=p.gpu_lock_dir),
    previous_stage_dir=list(i.previous_stage),
)
steps.finish_job_process()
