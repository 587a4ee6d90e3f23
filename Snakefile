# regioncl: raw images -> proposals -> shards -> pretraining -> conversion -> finetuning ->
# evaluation -> tables. The stages live in workflow/rules/, one file each; every rule calls
# the `regioncl` CLI. Default config: the embedded dataset on a laptop CPU.
import sys

from snakemake.utils import min_version, validate

# The regioncl package of this checkout, also where it is not pip-installed (conda envs).
sys.path.insert(0, workflow.basedir)

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
include: "workflow/rules/probe.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/curves.smk"


# Shards and converted weights are targets too, not just intermediates: they are products
# users keep (shards feed every pretraining run), and Snakemake rebuilds a deleted target,
# then re-runs what depends on it. A deleted intermediate would be silently ignored.
rule all:
    input:
        TABLES,
        PAPER_TABLES,
        CURVE_PLOTS,
        PLAN.pretrain_data_products(),
        PLAN.converted_weights(),
        PROBES,
    default_target: True
