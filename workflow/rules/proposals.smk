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
    threads: PLAN.proposal_processes
    resources:
        runtime=PLAN.resource("proposals", "runtime", 120),
        slurm_partition=PLAN.resource("proposals", "partition", None),
        slurm_account=PLAN.resource("proposals", "account", None),
        mem_mb=PLAN.resource("proposals", "mem_mb", 4000),
    conda:
        ENV,
    log:
        "results/logs/proposals/{dataset}/{chunk}.log",
    shell:
        "python -m regioncl.cli proposals run --list {input} --chunk {wildcards.chunk} "
        "--num-chunks {params.num_chunks} --processes {threads} --settings {params.settings} "
        "--out {output.proposals} --report {output.report} 2>&1 | tee {log}"


rule proposal_stats:
    input:
        reports=lambda w: PLAN.proposal_files(w.dataset, ".report.json"),
        proposals=lambda w: PLAN.proposal_files(w.dataset, ".parquet"),
    output:
        "results/proposals/{dataset}/stats.json",
    conda:
        ENV,
    log:
        "results/logs/proposals/{dataset}/stats.log",
    shell:
        "python -m regioncl.cli proposals stats --reports {input.reports} --proposals {input.proposals} "
        "--out {output} 2>&1 | tee {log}"
