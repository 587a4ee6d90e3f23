# Shared by all rules: the validated plan (runs, chunks, finetune jobs) and input functions.
# All logic lives in regioncl.config; rules only look things up.
#
# Every value a rule puts into its shell command is quoted ({input:q}, {params.root:q}, ...):
# a dataset root may hold spaces, quotes or `$(...)`. Three params are shell words already and
# stay bare: `settings` (PLAN.quoted: one quoted JSON argument), `launch` and `gpus`
# (shlex.join). Every rule's cluster resources come from PLAN.rule_resources (regioncl/resources.py).
import glob

from regioncl.config import WorkflowPlan, use_package_from
from regioncl.tables.layout import load_tables_config
from regioncl.tables.paper import table_outputs

# Datasets are checked (annotation JSON parsed whole) by the main snakemake process only, not
# again by every cluster job that re-reads this file.
PLAN = WorkflowPlan(config, check_datasets=workflow.is_main_process)
TABLES = ["results/tables/summary.md", "results/tables/summary.csv"]
TABLES_CONFIG = f"{workflow.basedir}/{config['tables']['config']}"
REFERENCE_DIR = f"{workflow.basedir}/config/reference"
PAPER_TABLES = table_outputs(list(load_tables_config(TABLES_CONFIG)), "results/tables", "results/plots")
# The environment every rule runs in under `--sdm conda` (locally: the active venv).
ENV = f"{workflow.basedir}/envs/regioncl.yaml"
# Rules run `python -m regioncl.cli` from this checkout (jobs inherit the path; cluster jobs
# re-read this file), so the conda env needs no install step for the package.
use_package_from(workflow.basedir)
# The pretraining chain (proposals -> shards -> pretrain -> convert) is every run's critical
# path: jobs off it (the baselines' finetunes, probes) take the cores it leaves free rather
# than slow it (on 2 cores the default run's `random` finetune and probe otherwise start first
# and leave one core to the proposals).
CRITICAL_PATH_PRIORITY = 10


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    chunk=r"\d{5}",
    run=r"[A-Za-z0-9_]+",
    benchmark=r"[A-Za-z0-9_]+",
    seed=r"\d+",
