# Shared by all rules: the validated plan (runs, chunks, finetune jobs) and input functions.
# All logic lives in regioncl.config; rules only look things up.
from regioncl.config import WorkflowPlan, use_package_from

PLAN = WorkflowPlan.from_config(config)
TABLES = ["results/tables/summary.md", "results/tables/summary.csv"]
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
