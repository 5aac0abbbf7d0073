# predict[input set]: segment new images with the selected model or ensemble, all its folds and the postprocessing
# (docs/method.md §9). The same code runs as `nnsnake predict -i IN -o OUT -m results/<DatasetName>`.


rule predict:
    input:
        unpack(all_trained_models),
        derived_plans=derived_plans_files,
        selection=f"{RESULTS}/selection.json",
        postprocessing=f"{RESULTS}/postprocessing.json",
        images=prediction_input_files,
    output:
        f"{RESULTS}/predictions/{{input_set}}/prediction.json",
    log:
        f"{LOGS}/predict_{{input_set}}.log",
    conda:
        CONDA_ENV
    threads: 4
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    params:
        input_dir=prediction_input_dir,
        results_dir=results_dir_of_selection,
        inference=config["inference"],
        prediction=config["prediction"],
    script:
        "../scripts/predict.py"
