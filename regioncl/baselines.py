"""The baselines the tables set beside pretraining: runs that start from no self-supervised
pretraining, the papers' "Scratch" / "random init." and "Supervised" rows.

- ``random``: a randomly initialised detector; it has no weights, so it is one run for every
  architecture, named after the method alone (``random``).
- ``supervised``: an ImageNet-supervised ResNet (torchvision's classification weights or a local
  torchvision state dict, ``regioncl.convert.SupervisedSource``) converted into the same weights
  files as a pretrained run's; one run per architecture, ``supervised_{arch-short}``
  (``supervised_r50``), whose weights are ``results/weights/supervised_r50.{tv.pth,d2.pkl}``.
"""

from __future__ import annotations

RANDOM = "random"
SUPERVISED = "supervised"
BASELINES = (RANDOM, SUPERVISED)
WITH_WEIGHTS = (SUPERVISED,)  # baselines whose runs are converted per architecture


def baseline_run(method: str, arch_short: str) -> str:
    """The run name of baseline ``method`` on the architecture of short name ``arch_short`` (r50)."""
    if method not in BASELINES:
        raise ValueError(f"{method!r} is not a baseline; baselines: {list(BASELINES)}")
    return f"{method}_{arch_short}" if method in WITH_WEIGHTS else method
