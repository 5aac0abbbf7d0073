from pathlib import Path

from nnsnake import steps
from nnsnake.evaluation import validate_fold

inputs, outputs = dict(snakemake.input.items()), dict(snakemake.output.items())
steps.setup_logging(snakemake.log[0])
validate_fold(
    Path(inputs["preprocessed"]).parent,
    inputs["plans"],
    snakemake.params.configuration,
    snakemake.params.dataset,
    inputs["splits"],
    snakemake.wildcards.fold,
    inputs["model"],
    Path(outputs["summary"]).parent,
    device=snakemake.params.inference["device"],
    mirroring=snakemake.params.inference["mirroring"],
    step_size=snakemake.params.inference["step_size"],
    num_threads=snakemake.threads,
    autocast=snakemake.params.inference["autocast"],
    previous_stage_dir=list(inputs["previous_stage"]) or None,
    # validate_lowres also writes the cascade's input (at the 3d_fullres preprocessed shape)
    next_stage_preprocessed_dir=Path(inputs["next_stage_manifest"]).parent
    if "next_stage_manifest" in inputs
    else None,
    next_stage_output_dir=outputs.get("next_stage"),
)
