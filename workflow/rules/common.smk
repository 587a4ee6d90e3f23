# Shared by all rules: the validated plan (runs, chunks, finetune jobs) and input functions.
# All logic lives in regioncl.config; rules only look things up.
from regioncl.config import WorkflowPlan

PLAN = WorkflowPlan.from_config(config)
TABLES = ["results/tables/summary.md", "results/tables/summary.csv"]


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    chunk=r"\d{5}",
    run=r"[A-Za-z0-9_]+",
    benchmark=r"[A-Za-z0-9_]+",
    seed=r"\d+",


def resources_of(stage, key, default):
    """A per-rule cluster resource from the config's `resources` section."""
    section = config.get("resources", {})
    return section.get(stage, {}).get(key, section.get("default", {}).get(key, default))
