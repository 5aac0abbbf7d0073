from pathlib import Path

from nnsnake import steps

i, o, p = dict(snakemake.input.items()), dict(snakemake.output.items()), snakemake.params
steps.setup_logging(snakemake.log[0])
steps.validate(
    Path(i["preprocessed"]).parent,
    i["plans"],
    p.configuration,
    p.dataset,
    i["splits"],
    snakemake.wildcards.fold,
    i["model"],
    Path(o["summary"]).parent,
    dict(p.inference, threads=snakemake.threads),
    previous_stage_dir=list(i["previous_stage"]),
    # validate_lowres also writes the cascade's input (at the 3d_fullres preprocessed shape)
    next_stage_preprocessed_dir=Path(i["next_stage_manifest"]).parent if "next_stage_manifest" in i else None,
    next_stage_output_dir=o.get("next_stage"),
)
steps.finish_job_process()
