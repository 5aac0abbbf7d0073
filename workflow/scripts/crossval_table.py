from nnsnake import steps
from nnsnake.reporting import write_crossval_report

steps.setup_logging(snakemake.log[0])
summaries = {
    name: path for name, path in snakemake.input.items() if name not in ("bootstrap", "dataset_json")
}
table = write_crossval_report(
    summaries,
    snakemake.input.bootstrap,
    snakemake.input.dataset_json,
    snakemake.output.html,
    snakemake.output.csv,
)
steps.log.info("cross-validation table of %d candidates:\n%s", len(table), table.to_string(index=False))
