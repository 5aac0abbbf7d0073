# preprocess[configuration]   (docs/method.md §4)
# Case files are written next to the manifest but only the manifest is a declared output: Snakemake then never
# deletes the cases, so a rerun after a plan edit or a crash recomputes only the cases that changed.


rule preprocess:
    input:
        plans=plans_file,
        verification=f"{RESULTS}/verification.json",
        raw=raw_training_files,
    output:
        f"{RESULTS}/{{planner_dir}}preprocessed/{{configuration}}/manifest.json",
    log:
        f"{LOGS}/{{planner_dir}}preprocess_{{configuration}}.log",
    conda:
        CONDA_ENV
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 2000 + 2000 * threads,
        runtime=240,
    params:
        dataset=str(DATASET_DIR),
        store=config["preprocessing"]["store"],
    script:
        "../scripts/preprocess.py"
