# One (possibly distributed) pretraining job per run. Resumable checkpoints live in
# results/work/, which is not a declared output: Snakemake deletes the outputs of a failed
# job, and a re-run must find the checkpoints to resume from.


rule pretrain:
    input:
        lambda w: PLAN.shards_of(PLAN.run(w.run).dataset),
    output:
        "results/pretrain/{run}/checkpoint_final.pt",
    params:
        settings=lambda w: PLAN.quoted(PLAN.run(w.run).settings),
        workdir="results/work/pretrain/{run}",
        nproc=PLAN.pretrain_nproc_per_node,
    threads: PLAN.pretrain_threads
    resources:
        runtime=PLAN.resource("pretrain", "runtime", 60),
        mem_mb=PLAN.resource("pretrain", "mem_mb", 8000),
        nodes=PLAN.resource("pretrain", "nodes", 1),
    conda:
        ENV,
    log:
        "results/logs/pretrain/{run}.log",
    shell:
        "python -m regioncl.cli pretrain --settings {params.settings} --shards {input} "
        "--nproc-per-node {params.nproc} --workdir {params.workdir} --out {output} 2>&1 | tee {log}"
