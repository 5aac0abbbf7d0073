from nnsnake import steps
from nnsnake.evaluation import select

steps.setup_logging(snakemake.log[0])
candidates = {
    name: path for name, path in snakemake.input.items() if name.startswith(("ensemble_", "2d", "3d"))
}
select(
    candidates,
    snakemake.output.selection,
    snakemake.output.bootstrap,
    snakemake.output.plot,
    n_bootstrap=snakemake.params.selection["n_bootstrap"],
    seed=snakemake.params.selection["seed"],
    min_win_share=snakemake.params.selection["min_win_share"],
    dataset_dir=snakemake.params.dataset,
    plans_path=snakemake.input.plans,
    folds=snakemake.params.folds,
)
