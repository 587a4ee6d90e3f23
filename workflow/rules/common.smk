# Shared by all rules: the validated plan (runs, chunks, finetune jobs) and input functions.
# All logic lives in regioncl.config; rules only look things up.
import glob

from regioncl.config import WorkflowPlan, use_package_from
from regioncl.tables.paper import load_tables_config, table_outputs

PLAN = WorkflowPlan.from_config(config)
TABLES = ["results/tables/summary.md", "results/tables/summary.csv"]
TABLES_CONFIG = f"{workflow.basedir}/{config['tables']['config']}"
REFERENCE_DIR = f"{workflow.basedir}/config/reference"
PAPER_TABLES = table_outputs(list(load_tables_config(TABLES_CONFIG)), "results/tables", "results/plots")
# The environment every rule runs in under `--sdm conda` (locally: the active venv).
ENV = f"{workflow.basedir}/envs/regioncl.yaml"
# Rules run `python -m regioncl.cli` from this checkout (jobs inherit the path; cluster jobs
# re-read this file), so the conda env needs no install step for the package.
use_package_from(workflow.basedir)


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    chunk=r"\d{5}",
    run=r"[A-Za-z0-9_]+",
    benchmark=r"[A-Za-z0-9_]+",
    seed=r"\d+",
