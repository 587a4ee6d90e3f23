# Metrics JSON -> pandas -> result tables.


rule tables:
    input:
        PLAN.metrics_files(),
    output:
        markdown=TABLES[0],
        csv=TABLES[1],
    log:
        "results/logs/tables.log",
    shell:
        "regioncl tables --metrics {input} --markdown {output.markdown} --csv {output.csv} "
        "2>&1 | tee {log}"
