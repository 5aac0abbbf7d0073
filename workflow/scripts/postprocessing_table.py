from nnsnake import steps
from nnsnake.reporting import write_postprocessing_report

steps.setup_logging(snakemake.log[0])
table = write_postprocessing_report(
    snakemake.input.decision, snakemake.input.dataset_json, snakemake.output[0]
)
steps.log.info("postprocessing trials:\n%s", table.to_string(index=False))
