"""Pretraining methods, registered by name (``get_method("moco_v2")``)."""

from regioncl.methods import byol, moco_v2  # noqa: E402,F401 -- importing a method module registers it
from regioncl.methods import detco, dupr  # noqa: E402,F401
from regioncl.methods import soco  # noqa: E402,F401
from regioncl.methods import resim  # noqa: E402,F401
from regioncl.methods import plrc  # noqa: E402,F401
from regioncl.methods.base import (
    METHODS,
    PretrainMethod,
    StepInfo,
    available_methods,
    get_method,
    pad_ragged,
    register_method,
)

__all__ = ["METHODS", "PretrainMethod", "StepInfo", "available_methods", "get_method", "pad_ragged", "register_method"]
