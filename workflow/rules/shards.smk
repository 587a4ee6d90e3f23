# WebDataset shards: each chunk's original image bytes packed with its proposals.


rule shards:
    input:
        "results/proposals/{dataset}/{chunk}.parquet",
    output:
        "results/shards/{dataset}/{chunk}.tar",
    priority: CRITICAL_PATH_PRIORITY
    resources:
        **PLAN.rule_resources("shards"),
    conda:
        ENV,
    log:
        "results/logs/shards/{dataset}/{chunk}.log",
    shell:
        "python -m regioncl.cli shards --proposals {input:q} --out {output:q} 2>&1 | tee {log:q}"
