# Pretrained weights to a torchvision detection state dict and a detectron2 .pkl. The
# `supervised` baseline enters here too (regioncl/baselines.py): its run `supervised_{arch}`
# converts ImageNet-supervised weights, torchvision's (downloaded by the job) or a local state
# dict (then its input), into the same two files. `source` is shell words already (shlex.join).


rule convert:
    input:
        lambda w: PLAN.convert_inputs(w.run),
    output:
        torchvision="results/weights/{run}.tv.pth",
        detectron2="results/weights/{run}.d2.pkl",
    params:
        source=lambda w: PLAN.convert_source_args(w.run),
    priority: CRITICAL_PATH_PRIORITY
    resources:
        **PLAN.rule_resources("convert"),
    conda:
        ENV,
    log:
        "results/logs/convert/{run}.log",
    shell:
        "python -m regioncl.cli convert {params.source} --torchvision {output.torchvision:q} "
        "--detectron2 {output.detectron2:q} 2>&1 | tee {log:q}"
