"""The pretraining engine: settings, the training loop, distributed launch, checkpoints, schedules.

The CLI calls ``pretrain(PretrainSettings.from_dict(config), shards, out, workdir)``; under
``torchrun`` or ``srun`` every process makes that same call.
"""

from regioncl.engine.settings import OptimizerSettings, PretrainSettings
from regioncl.engine.train import pretrain, run_identity

__all__ = ["OptimizerSettings", "PretrainSettings", "pretrain", "run_identity"]
