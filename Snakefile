# nnsnake: the nnU-Net method as a Snakemake workflow.
#   snakemake --cores all --resources gpu=1                      (the embedded demo dataset)
#   snakemake --cores all --resources gpu=1 --config dataset=/data/Dataset004_Hippocampus
#   snakemake preprocess_all | train_all                         (stop after a stage: workflow/rules/targets.smk)
from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/targets.smk"


rule all:
    default_target: True
    input:
        # every planner's plans as plain paths, so that the first DAG holds each plan job (--until plan)
        all_plans_files(),
        final_outputs,
