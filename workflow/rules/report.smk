# Readable tables for `snakemake --report report.html`: the report shows images and HTML pages, but JSON and CSV
# files only as downloads, so the selection's numbers are rendered as small HTML pages (nnsnake.reporting). Both
# rules are light: run_step runs them inside Snakemake's own process locally.


rule crossval_table:
    input:
        unpack(candidate_summaries),
        bootstrap=f"{RESULTS}/bootstrap.json",
        dataset_json=DATASET_JSON,
    output:
        html=report(
            f"{RESULTS}/report/crossval.html",
            caption="../report/crossval.rst",
            category="Model selection",
            labels={"item": "cross-validation table"},
        ),
        csv=f"{RESULTS}/report/crossval.csv",
    log:
        f"{LOGS}/crossval_table.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        candidates=candidate_summaries,
    run:
        run_step(
            steps.crossval_table,
            log,
            params.candidates,
            input.bootstrap,
            input.dataset_json,
            output.html,
            output.csv,
        )


rule postprocessing_table:
    input:
        decision=f"{RESULTS}/postprocessing.json",
        dataset_json=DATASET_JSON,
    output:
        report(
            f"{RESULTS}/report/postprocessing.html",
            caption="../report/postprocessing_table.rst",
            category="Model selection",
            labels={"item": "postprocessing decision"},
        ),
    log:
        f"{LOGS}/postprocessing_table.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    run:
        run_step(steps.postprocessing_table, log, input.decision, input.dataset_json, output[0])
