# regioncl: raw images -> proposals -> shards -> pretraining -> conversion -> finetuning ->
# evaluation -> tables. The stages live in workflow/rules/, one file each; every rule calls
# the `regioncl` CLI. Default config: the embedded dataset on a laptop CPU.
from snakemake.utils import min_version, validate

min_version("9.0")


# Relative to this file, so `snakemake -d OTHER_DIR` (outputs elsewhere) finds the default.
configfile: f"{workflow.basedir}/config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/proposals.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"


rule all:
    input:
        TABLES,
    default_target: True
