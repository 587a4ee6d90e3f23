# Training curves: every pretraining run's and finetuning job's per-step loss and lr (written
# by those jobs to results/metrics/, regioncl/curves.py) drawn into results/plots/, the
# contrastive methods' chance level dashed. The plots go into the report.
from regioncl.curves import PRETRAIN_PLOT, finetune_plot

PRETRAIN_METRICS = [f"results/metrics/pretrain/{run}.jsonl" for run in PLAN.runs]
FINETUNE_METRICS = [f"results/metrics/finetune/{job.run}/{job.benchmark}/seed{job.seed}.jsonl" for job in PLAN.jobs]
CURVE_PLOTS = [f"results/plots/{PRETRAIN_PLOT}"] + [f"results/plots/{finetune_plot(b)}" for b in PLAN.benchmarks]


rule curves:
    input:
        pretrain=PRETRAIN_METRICS,
        finetune=FINETUNE_METRICS,
    output:
        [report(path, caption="../report/curves.rst", category="Training curves") for path in CURVE_PLOTS],
    params:
        out_dir=lambda w, output: os.path.dirname(output[0]),
    resources:
        **PLAN.rule_resources("curves"),
    conda:
        ENV,
    log:
        "results/logs/curves.log",
    shell:
        "python -m regioncl.cli curves --pretrain {input.pretrain:q} --finetune {input.finetune:q} "
        "--out-dir {params.out_dir:q} 2>&1 | tee {log:q}"
