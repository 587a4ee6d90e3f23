# Finetune a detector per (run, benchmark, seed). Baselines such as `random` have no weights.


rule finetune:
    input:
        weights=lambda w: PLAN.weights_inputs(w.run, w.benchmark),
        dataset=lambda w: PLAN.benchmark_inputs(w.benchmark),
    output:
        "results/finetune/{run}/{benchmark}/seed{seed}/model.pt",
    params:
        settings=lambda w: PLAN.quoted(PLAN.benchmark(w.benchmark)),
        weights=lambda w: PLAN.weights_arg(w.run, w.benchmark),
        workdir="results/work/finetune/{run}/{benchmark}/seed{seed}",
    threads: PLAN.finetune_threads
    resources:
        runtime=PLAN.resource("finetune", "runtime", 60),
        slurm_partition=PLAN.resource("finetune", "partition", None),
        slurm_account=PLAN.resource("finetune", "account", None),
        mem_mb=PLAN.resource("finetune", "mem_mb", 8000),
    conda:
        ENV,
    log:
        "results/logs/finetune/{run}/{benchmark}/seed{seed}.log",
    shell:
        "python -m regioncl.cli finetune --settings {params.settings} --weights {params.weights} "
        "--seed {wildcards.seed} --workdir {params.workdir} --out {output} 2>&1 | tee {log}"
