# train[configuration, fold]   (docs/method.md §5)
# The resumable state (checkpoint_latest.pt, a running log and plot) lives under work/, which is never a declared
# output: Snakemake deletes outputs when a job starts or fails, never the state. The declared outputs are written
# last, atomically, so a killed or timed-out job simply reruns and resumes where it stopped.
# 3d_cascade_fullres (docs/method.md §5.8) also takes the 3d_lowres out-of-fold predictions of every training case
# (written by validate_lowres, one folder per lowres fold) as extra one-hot input channels.


rule train:
    input:
        plans=plans_file,
        splits=f"{RESULTS}/splits.json",
        preprocessed=preprocessed_manifest,
        dataset_json=DATASET_JSON,
        previous_stage=previous_stage_for_training,
        pretrained=pretrained_weights_file,
    output:
        model=f"{RESULTS}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}/model_final.pt",
        log=f"{RESULTS}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}/log.json",
        plot=report(
            f"{RESULTS}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}/progress.png",
            caption="../report/progress.rst",
            category="Training",
            subcategory="{planner_dir}{configuration}",
            labels={"configuration": "{configuration}", "fold": "{fold}"},
        ),
    log:
        f"{LOGS}/{{planner_dir}}train_{{configuration}}_fold_{{fold}}.log",
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=48 * 60,
    params:
        state_dir=f"{WORK}/{{planner_dir}}training/{{configuration}}/fold_{{fold}}",
        gpu_lock_dir=f"{config['work']}/gpu_locks",
        settings=training_settings,
    script:
        "../scripts/train.py"
