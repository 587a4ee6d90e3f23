# One (possibly distributed) pretraining job per run. Resumable checkpoints live in
# results/work/, which is not a declared output: Snakemake deletes the outputs of a failed
# job, and a re-run must find the checkpoints to resume from.
#
# `pretrain.launch.mode` picks how the job starts its processes (regioncl/launch.py,
# docs/slurm.md): `standalone` (one node; torchrun --standalone when nproc_per_node > 1),
# `per_node` (one SLURM task per node running torchrun, c10d rendezvous on the first host) or
# `per_task` (one SLURM task per process, ranks from SLURM). Multi-task modes need SLURM.
from regioncl.launch import LaunchPlan, LaunchSettings

PRETRAIN_LAUNCH = LaunchPlan.build(
    LaunchSettings.from_dict(config["pretrain"].get("launch", {})),
    nodes=PLAN.cluster.nodes("pretrain"),
    nproc_per_node=PLAN.pretrain_nproc_per_node,
    gpus_per_node=PLAN.cluster.gpus("pretrain"),
    cpus_per_task=PLAN.cluster.cpus("pretrain"),
)


rule pretrain:
    input:
        lambda w: PLAN.shards_of(PLAN.run(w.run).dataset),
    output:
        checkpoint="results/pretrain/{run}/checkpoint_final.pt",
        metrics="results/metrics/pretrain/{run}.jsonl",
    params:
        settings=lambda w: PLAN.quoted(PLAN.run(w.run).settings),
        workdir="results/work/pretrain/{run}",
        nproc=PLAN.pretrain_nproc_per_node,
        launch=PRETRAIN_LAUNCH.step_prefix(),
    priority: CRITICAL_PATH_PRIORITY
    threads: PLAN.pretrain_threads
    resources:
        # the launch mode's task geometry (nodes, tasks, mpi) on top of the config's resources
        **PLAN.rule_resources("pretrain") | PRETRAIN_LAUNCH.slurm_resources(),
    conda:
        ENV,
    log:
        "results/logs/pretrain/{run}.log",
    shell:
        "{params.launch} python -m regioncl.cli pretrain --settings {params.settings} --shards {input:q} "
        "--nproc-per-node {params.nproc:q} --workdir {params.workdir:q} --out {output.checkpoint:q} "
        "--metrics {output.metrics:q} 2>&1 | tee {log:q}"
