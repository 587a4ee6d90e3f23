# COCO-style AP of a finetuned detector (mIoU of a semantic-segmentation FCN) on its benchmark's
# evaluation split.


rule evaluate:
    input:
        model="results/finetune/{run}/{benchmark}/seed{seed}/model.pt",
        dataset=lambda w: PLAN.benchmark_inputs(w.benchmark),
    output:
        "results/finetune/{run}/{benchmark}/seed{seed}/metrics.json",
    params:
        settings=lambda w: PLAN.quoted(PLAN.benchmark(w.benchmark)),
        method=lambda w: PLAN.method_of(w.run),
        launch=lambda w: PLAN.launch_args("evaluate", w.benchmark),
    threads: PLAN.finetune_threads
    resources:
        **PLAN.rule_resources("evaluate"),
    conda:
        ENV,
    log:
        "results/logs/evaluate/{run}/{benchmark}/seed{seed}.log",
    shell:
        "python -m regioncl.cli evaluate --settings {params.settings} --model {input.model:q} "
        "--run {wildcards.run:q} --method {params.method:q} {params.launch} "
        "--out {output:q} 2>&1 | tee {log:q}"
