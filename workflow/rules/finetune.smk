# Finetune a detector (or an FCN: model fcn) per (run, benchmark, seed). Baselines such as `random` have no weights.
# As for pretraining, the job keeps its checkpoints in `workdir/<identity>`: a hash of the
# resolved benchmark settings, the seed and the weights file's sha256 (regioncl.transfer.identity),
# so a re-run after a changed setting or replaced weights starts afresh instead of resuming.


rule finetune:
    input:
        weights=lambda w: PLAN.weights_inputs(w.run, w.benchmark),
        dataset=lambda w: PLAN.benchmark_inputs(w.benchmark),
    output:
        model="results/finetune/{run}/{benchmark}/seed{seed}/model.pt",
        metrics="results/metrics/finetune/{run}/{benchmark}/seed{seed}.jsonl",
    params:
        settings=lambda w: PLAN.quoted(PLAN.benchmark(w.benchmark)),
        weights=lambda w: PLAN.weights_arg(w.run, w.benchmark),
        workdir="results/work/finetune/{run}/{benchmark}/seed{seed}",
        launch=lambda w: PLAN.launch_args("finetune", w.benchmark),
    threads: PLAN.finetune_threads
    resources:
        **PLAN.rule_resources("finetune"),
    conda:
        ENV,
    log:
        "results/logs/finetune/{run}/{benchmark}/seed{seed}.log",
    shell:
        "python -m regioncl.cli finetune --settings {params.settings} --weights {params.weights:q} "
        "--seed {wildcards.seed:q} --workdir {params.workdir:q} {params.launch} --out {output.model:q} "
        "--metrics {output.metrics:q} 2>&1 | tee {log:q}"
