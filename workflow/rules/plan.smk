# verify -> fingerprint -> plan (checkpoint) -> splits   (docs/method.md §1, 2, 3, 6)


# verify reads every case once and also fingerprints it (case_fingerprints.npz); the fingerprint job aggregates.
# The light rules (fingerprint, plan, derive_plans, splits) run their step with run_step: inside Snakemake's own
# process locally, a job of their own on a cluster.
rule verify:
    input:
        raw_training_files,
    output:
        report=f"{RESULTS}/verification.json",
        case_fingerprints=f"{RESULTS}/case_fingerprints.npz",
    log:
        f"{LOGS}/verify.log",
    conda:
        CONDA_ENV
    threads: 8
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        dataset=str(DATASET_DIR),
    script:
        "../scripts/verify.py"


rule fingerprint:
    input:
        verification=f"{RESULTS}/verification.json",
        case_fingerprints=f"{RESULTS}/case_fingerprints.npz",
    output:
        f"{RESULTS}/fingerprint.json",
    log:
        f"{LOGS}/fingerprint.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
    params:
        dataset=str(DATASET_DIR),
    run:
        run_step(
            steps.fingerprint,
            log,
            params.dataset,
            output[0],
            case_fingerprints=input.case_fingerprints,
        )


# One checkpoint for every planner of config planning.planners: {planner_dir} is "" for the default planner
# (results/<DS>/plans.json) and "<plans_name>/" for the others; the planner follows from the plans name.
checkpoint plan:
    input:
        fingerprint=f"{RESULTS}/fingerprint.json",
        dataset_json=DATASET_JSON,
        transfer_source=transfer_plans_source,
    output:
        f"{RESULTS}/{{planner_dir}}plans.json",
    log:
        f"{LOGS}/{{planner_dir}}plan.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        dataset=dataset_folder_of_json,
        gpu_memory_target_gb=gpu_memory_target_gb,
        overwrite_target_spacing=config["planning"]["overwrite_target_spacing"],
        planner=planner_of_dir,
        transfer_plans_from=config["planning"]["transfer_plans_from"],
    run:
        run_step(
            steps.plan,
            log,
            input.fingerprint,
            params.dataset,
            output[0],
            gpu_memory_target_gb=params.gpu_memory_target_gb,
            overwrite_target_spacing=params.overwrite_target_spacing,
            planner=params.planner,
            transfer_plans_from=params.transfer_plans_from,
        )


# A derived configuration (config planning.extra_configurations, nnU-Net's inherits_from) gets its own plans file,
# plans.json plus its entry: adding or editing one leaves plans.json, and so every other training, as it was.
rule derive_plans:
    input:
        plans=f"{RESULTS}/{{planner_dir}}plans.json",
    output:
        f"{RESULTS}/{{planner_dir}}derived/{{configuration}}/plans.json",
    log:
        f"{LOGS}/{{planner_dir}}derive_plans_{{configuration}}.log",
    localrule: True
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        entries=lambda wildcards: derivation_chain(wildcards.configuration),
    run:
        run_step(steps.derive_plans, log, input.plans, params.entries, output[0])


rule splits:
    input:
        verification=f"{RESULTS}/verification.json",
        user_splits=user_splits_file,
    output:
        f"{RESULTS}/splits.json",
    log:
        f"{LOGS}/splits.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    run:
        run_step(steps.splits, log, input.verification, output[0], next(iter(input.user_splits), None))
