# verify -> fingerprint -> plan (checkpoint) -> splits   (docs/method.md §1, 2, 3, 6)


rule verify:
    input:
        raw_training_files,
    output:
        f"{RESULTS}/verification.json",
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
        raw=raw_training_files,
    output:
        f"{RESULTS}/fingerprint.json",
    log:
        f"{LOGS}/fingerprint.log",
    conda:
        CONDA_ENV
    threads: 8
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        dataset=str(DATASET_DIR),
    script:
        "../scripts/fingerprint.py"


checkpoint plan:
    input:
        fingerprint=f"{RESULTS}/fingerprint.json",
        dataset_json=DATASET_JSON,
    output:
        f"{RESULTS}/plans.json",
    log:
        f"{LOGS}/plan.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        dataset=dataset_folder_of_json,
        gpu_memory_target_gb=config["planning"]["gpu_memory_target_gb"],
        overwrite_target_spacing=config["planning"]["overwrite_target_spacing"],
    script:
        "../scripts/plan.py"


rule splits:
    input:
        verification=f"{RESULTS}/verification.json",
        user_splits=user_splits_file,
    output:
        f"{RESULTS}/splits.json",
    log:
        f"{LOGS}/splits.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../scripts/splits.py"
