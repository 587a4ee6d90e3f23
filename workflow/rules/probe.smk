# A linear probe of each run's frozen backbone, and of a randomly initialised one, on the
# labeled boxes of the embedded dataset (regioncl/probe.py): under a minute per checkpoint, beside the
# minutes of a finetune. Its record is a metrics record, so the tables show it as a column.
from regioncl.probe import probe_targets, probe_weights

PROBES = probe_targets(PLAN)


rule probe:
    input:
        weights=lambda w: probe_weights(PLAN, w.run),
        dataset=lambda w: PLAN.benchmark_inputs(w.benchmark),
    output:
        "results/probe/{benchmark}/{run}.json",
    params:
        weights=lambda w: (probe_weights(PLAN, w.run) or ["none"])[0],
        arch=lambda w: PLAN.benchmark(w.benchmark)["arch"],
        data=lambda w: PLAN.benchmark(w.benchmark)["dataset"]["root"],
    threads: 1
    resources:
        **PLAN.rule_resources("probe"),
    conda:
        ENV,
    log:
        "results/logs/probe/{benchmark}/{run}.log",
    shell:
        "python -m regioncl.cli probe --weights {params.weights:q} --arch {params.arch:q} --data {params.data:q} "
        "--run {wildcards.run:q} --benchmark {wildcards.benchmark:q} --out {output:q} 2>&1 | tee {log:q}"
