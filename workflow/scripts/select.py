from nnsnake import steps

p = snakemake.params
steps.setup_logging(snakemake.log[0])
steps.select(
    p.candidates,
    snakemake.output.selection,
    snakemake.output.bootstrap,
    snakemake.output.plot,
    n_bootstrap=p.selection["n_bootstrap"],
    seed=p.selection["seed"],
    min_win_share=p.selection["min_win_share"],
    dataset_dir=p.dataset,
    plans_path=snakemake.input.plans,
    folds=p.folds,
    plans_paths=p.plans_paths,
    extra_configurations=p.extra_configurations,
)
steps.finish_job_process()
