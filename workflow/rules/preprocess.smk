# preprocess[configuration]   (docs/method.md §4)
# Case files are written next to the manifest but only the manifest is a declared output: Snakemake then never
# deletes the cases, so a rerun after a plan edit or a crash recomputes only the cases that changed.
#
# Config preprocessing.shards = n > 1 splits each preprocess job into n preprocess_shard jobs (shard i takes every
# n-th of the sorted cases, i = 0..n-1), which write their cases into the same folder and a shard manifest
# shards/<i>_of_<n>.json; preprocess then only merges those into the usual manifest.json (a local rule), so every
# later rule reads the same files as with one job. With n = 1 (the default) preprocess does the work itself and
# preprocess_shard has no jobs.


rule preprocess_shard:
    input:
        plans=plans_file,
        verification=f"{RESULTS}/verification.json",
        raw=raw_training_files,
    output:
        f"{RESULTS}/{{planner_dir}}preprocessed/{{configuration}}/shards/{{shard}}_of_{{shards}}.json",
    log:
        f"{LOGS}/{{planner_dir}}preprocess_shard_{{configuration}}_{{shard}}_of_{{shards}}.log",
    wildcard_constraints:
        shard=r"\d+",
        shards=r"\d+",
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
        "../scripts/preprocess_shard.py"


if PREPROCESS_SHARDS == 1:

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

else:

    rule preprocess:
        input:
            shards=expand(
                f"{RESULTS}/{{planner_dir}}preprocessed/{{configuration}}/shards/{{shard}}_of_{PREPROCESS_SHARDS}.json",
                shard=range(PREPROCESS_SHARDS),
                allow_missing=True,
            ),
        output:
            f"{RESULTS}/{{planner_dir}}preprocessed/{{configuration}}/manifest.json",
        log:
            f"{LOGS}/{{planner_dir}}preprocess_{{configuration}}.log",
        localrule: True
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=500,
            runtime=5,
        script:
            "../scripts/merge_preprocess_shards.py"
