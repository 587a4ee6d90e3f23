# The embedded default dataset (generated, no download) and the sorted image list of a
# pretraining dataset, from which chunks are cut deterministically.


rule embedded_dataset:
    output:
        PLAN.embedded_outputs(),
    params:
        root=lambda w, output: os.path.dirname(output[0]),
        settings=PLAN.quoted(PLAN.embedded_settings),
    resources:
        **PLAN.rule_resources("embedded_dataset"),
    conda:
        ENV,
    log:
        "results/logs/embedded_dataset.log",
    shell:
        "python -m regioncl.cli embedded --out {params.root:q} --settings {params.settings} 2>&1 | tee {log:q}"


rule image_list:
    input:
        lambda w: PLAN.dataset_inputs(w.dataset),
    output:
        "results/lists/{dataset}.tsv",
    params:
        layout=lambda w: PLAN.dataset(w.dataset).layout,
        root=lambda w: PLAN.dataset(w.dataset).root,
    resources:
        **PLAN.rule_resources("image_list"),
    conda:
        ENV,
    log:
        "results/logs/image_list/{dataset}.log",
    shell:
        "python -m regioncl.cli images --layout {params.layout:q} --root {params.root:q} --out {output:q} 2>&1 | tee {log:q}"
