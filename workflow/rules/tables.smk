# Metrics JSON -> pandas -> result tables.


rule tables:
    input:
        PLAN.metrics_files(),
    output:
        markdown=TABLES[0],
        csv=TABLES[1],
    conda:
        ENV,
    log:
        "results/logs/tables.log",
    shell:
        "python -m regioncl.cli tables --metrics {input} --markdown {output.markdown} --csv {output.csv} "
        "2>&1 | tee {log}"
