# validate[configuration, fold] -> crossval[candidate] -> select -> postprocess   (docs/method.md §5.10, 7, 8)


rule validate:
    input:
        model=f"{RESULTS}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}/model_final.pt",
        plans=plans_file,
        splits=f"{RESULTS}/splits.json",
        preprocessed=preprocessed_manifest,
        dataset_json=DATASET_JSON,
        previous_stage=previous_stage_for_validation,
    output:
        summary=f"{RESULTS}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}/validation/summary.json",
    log:
        f"{LOGS}/{{planner_dir}}validate_{{configuration}}_fold_{{fold}}.log",
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=120,
    params:
        configuration="{configuration}",
        dataset=dataset_folder_of_json,
        inference=config["inference"],
    script:
        "../scripts/validate.py"


# The 3d_lowres validation also writes what the cascade trains on (docs/method.md §5.8): each validation case's
# segmentation at the 3d_fullres preprocessed shape, as nnU-Net's predicted_next_stage/. It is the validate rule
# with other paths; the ruleorder gives it the 3d_lowres folds, which validate's own pattern also matches.
use rule validate as validate_lowres with:
    input:
        model=f"{RESULTS}/{{planner_dir}}training/3d_lowres/fold_{{fold}}/model_final.pt",
        plans=f"{RESULTS}/{{planner_dir}}plans.json",
        splits=f"{RESULTS}/splits.json",
        preprocessed=lambda wildcards: preprocessed_manifest_of(plans_name_of(wildcards), "3d_lowres"),
        next_stage_manifest=next_stage_manifest,
        dataset_json=DATASET_JSON,
        previous_stage=[],
    output:
        summary=f"{RESULTS}/{{planner_dir}}training/3d_lowres/fold_{{fold}}/validation/summary.json",
        next_stage=directory(
            f"{RESULTS}/{{planner_dir}}training/3d_lowres/fold_{{fold}}/predicted_next_stage"
        ),
    log:
        f"{LOGS}/{{planner_dir}}validate_3d_lowres_fold_{{fold}}.log",
    params:
        configuration="3d_lowres",
        dataset=dataset_folder_of_json,
        inference=config["inference"],


ruleorder: validate_lowres > validate


rule crossval:
    input:
        folds=lambda wildcards: expand(
            f"{RESULTS}/{wildcards.planner_dir}training/{wildcards.configuration}/fold_{{fold}}/validation/summary.json",
            fold=crossval_folds(),
        ),
        splits=f"{RESULTS}/splits.json",
        dataset_json=DATASET_JSON,
    output:
        f"{RESULTS}/{{planner_dir}}crossval/{{configuration}}/summary.json",
    log:
        f"{LOGS}/{{planner_dir}}crossval_{{configuration}}.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        dataset=dataset_folder_of_json,
    script:
        "../scripts/crossval.py"


rule ensemble_crossval:
    input:
        first=lambda wildcards: member_summary(wildcards.first),
        second=lambda wildcards: member_summary(wildcards.second),
        dataset_json=DATASET_JSON,
    output:
        f"{RESULTS}/crossval/ensemble_{{first}}+{{second}}/summary.json",
    log:
        f"{LOGS}/crossval_ensemble_{{first}}+{{second}}.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        dataset=dataset_folder_of_json,
    script:
        "../scripts/ensemble_crossval.py"


rule select:
    input:
        unpack(candidate_summaries),
        plans=f"{RESULTS}/plans.json",
        planner_plans=lambda wildcards: list(selection_plans(wildcards).values()),
        dataset_json=DATASET_JSON,
    output:
        selection=f"{RESULTS}/selection.json",
        bootstrap=f"{RESULTS}/bootstrap.json",
        plot=report(
            f"{RESULTS}/bootstrap.png",
            caption="../report/bootstrap.rst",
            category="Model selection",
            labels={"item": "bootstrap selection plot"},
        ),
    log:
        f"{LOGS}/select.log",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        candidates=candidate_summaries,
        dataset=dataset_folder_of_json,
        selection=config["selection"],
        folds=crossval_folds(),
        plans_paths=selection_plans,
        extra_configurations=EXTRA_CONFIGURATIONS,
    script:
        "../scripts/select.py"


rule postprocess:
    input:
        unpack(candidate_summaries),
        selection=f"{RESULTS}/selection.json",
        dataset_json=DATASET_JSON,
    output:
        report(
            f"{RESULTS}/postprocessing.json",
            caption="../report/postprocessing.rst",
            category="Model selection",
            labels={"item": "postprocessing decision (JSON)"},
        ),
    log:
        f"{LOGS}/postprocess.log",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        candidates=candidate_summaries,
        dataset=dataset_folder_of_json,
    script:
        "../scripts/postprocess.py"
