# WebDataset shards: each chunk's original image bytes packed with its proposals.


rule shards:
    input:
        "results/proposals/{dataset}/{chunk}.parquet",
    output:
        "results/shards/{dataset}/{chunk}.tar",
    log:
        "results/logs/shards/{dataset}/{chunk}.log",
    shell:
        "regioncl shards --proposals {input} --out {output} 2>&1 | tee {log}"
