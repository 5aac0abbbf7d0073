# Stage targets: run the workflow up to one stage.
#   snakemake preprocess_all   verify, fingerprint, plan, then every preprocessing the plan calls for
#   snakemake train_all        ... and splits and every training (config configurations x folds)
# `--until preprocess` cannot do this: --until picks its jobs from the DAG before Snakemake has resolved the plan
# checkpoint, so it finds no preprocess or train jobs and would run nothing (common.smk's plan_checkpoint() stops
# with this advice instead). `--until preprocess_all` / `--until train_all` work like the targets themselves.


rule preprocess_all:
    input:
        preprocessed_manifests,
    localrule: True


rule train_all:
    input:
        trained_models,
    localrule: True
