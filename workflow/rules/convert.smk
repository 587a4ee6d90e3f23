# Pretrained weights to a torchvision detection state dict and a detectron2 .pkl.


rule convert:
    input:
        "results/pretrain/{run}/checkpoint_final.pt",
    output:
        torchvision="results/weights/{run}.tv.pth",
        detectron2="results/weights/{run}.d2.pkl",
    resources:
        **PLAN.rule_resources("convert"),
    conda:
        ENV,
    log:
        "results/logs/convert/{run}.log",
    shell:
        "python -m regioncl.cli convert --checkpoint {input:q} --torchvision {output.torchvision:q} "
        "--detectron2 {output.detectron2:q} 2>&1 | tee {log:q}"
