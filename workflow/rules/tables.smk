# Metrics JSON -> pandas -> result tables. Outputs marked `report(...)` go into
# `snakemake --report report.html` (captions in workflow/report/).


report: "../report/workflow.rst"


rule tables:
    input:
        PLAN.metrics_files() + PROBES,
    output:
        markdown=report(TABLES[0], caption="../report/summary.rst", category="Tables", labels={"table": "summary", "format": "Markdown"}),
        csv=report(TABLES[1], caption="../report/summary.rst", category="Tables", labels={"table": "summary", "format": "CSV"}),
    resources:
        **PLAN.rule_resources("tables"),
    conda:
        ENV,
    log:
        "results/logs/tables.log",
    shell:
        "python -m regioncl.cli tables --metrics {input:q} --markdown {output.markdown:q} --csv {output.csv:q} "
        "2>&1 | tee {log:q}"


rule paper_tables:
    input:
        metrics=PLAN.metrics_files() + PROBES,
        tables=TABLES_CONFIG,
        reference=sorted(glob.glob(f"{REFERENCE_DIR}/*.yaml")),
    output:
        [
            report(
                path,
                caption="../report/plots.rst" if path.endswith(".png") else "../report/paper_table.rst",
                category="Paper tables",
            )
            for path in PAPER_TABLES
        ],
    params:
        reference_dir=lambda w, input: os.path.dirname(input.reference[0]),
    resources:
        **PLAN.rule_resources("paper_tables"),
    conda:
        ENV,
    log:
        "results/logs/paper_tables.log",
    shell:
        "python -m regioncl.cli paper-tables --metrics {input.metrics:q} --tables {input.tables:q} "
        "--reference-dir {params.reference_dir:q} --out-dir results/tables --plots-dir results/plots "
        "2>&1 | tee {log:q}"
