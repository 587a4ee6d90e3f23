# Offline selective search with SoCo's box filter: one job per chunk of the sorted image list.


rule proposals:
    input:
        "results/lists/{dataset}.tsv",
    output:
        proposals="results/proposals/{dataset}/{chunk}.parquet",
        report="results/proposals/{dataset}/{chunk}.report.json",
    params:
        num_chunks=lambda w: PLAN.num_chunks(w.dataset),
        settings=PLAN.quoted(PLAN.proposal_settings),
    priority: CRITICAL_PATH_PRIORITY
    threads: PLAN.proposal_processes
    resources:
        **PLAN.rule_resources("proposals"),
    conda:
        ENV,
    log:
        "results/logs/proposals/{dataset}/{chunk}.log",
    shell:
        "python -m regioncl.cli proposals run --list {input:q} --chunk {wildcards.chunk:q} "
        "--num-chunks {params.num_chunks:q} --processes {threads:q} --settings {params.settings} "
        "--out {output.proposals:q} --report {output.report:q} 2>&1 | tee {log:q}"


rule proposal_stats:
    input:
        reports=lambda w: PLAN.proposal_files(w.dataset, ".report.json"),
        proposals=lambda w: PLAN.proposal_files(w.dataset, ".parquet"),
    output:
        "results/proposals/{dataset}/stats.json",
    resources:
        **PLAN.rule_resources("proposal_stats"),
    conda:
        ENV,
    log:
        "results/logs/proposals/{dataset}/stats.log",
    shell:
        "python -m regioncl.cli proposals stats --reports {input.reports:q} --proposals {input.proposals:q} "
        "--out {output:q} 2>&1 | tee {log:q}"
