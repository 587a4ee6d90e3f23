"""Work around detectron2's Cityscapes evaluator importing an internal module path.

Recent detectron2 source imports ``deeplearning.projects.cityscapesApi.cityscapesscripts...``
inside ``CityscapesInstanceEvaluator.process`` (``helpers.labels``) and ``.evaluate``
(``evaluation.evalInstanceLevelSemanticLabeling``) (facebookresearch/detectron2 issue 5436, see
ECOSYSTEM.md), a path that exists only inside Meta. Python's import system looks every dotted
name up in ``sys.modules`` first, so aliasing that path to the public ``cityscapesscripts``
package (pip ``cityscapesscripts``) makes the evaluator import what it always meant to.

cityscapesscripts 2.3 is also out of date with NumPy 2: it calls ``np.in1d`` (removed in 2.4)
and json-dumps numpy integers through ``writeDict2JSON`` (``default=o.__dict__``). Its instance
evaluation module gets a numpy whose ``in1d`` is ``isin`` flattened (``in1d``'s documented
equivalent) and a ``writeDict2JSON`` that writes numpy scalars as Python numbers.

Its ``evaluateMatches`` also crashes (``IndexError`` on ``yTrueSortedCumsum[-1]``,
mcordts/cityscapesScripts issue 89, open) when a class has ground truth and predictions but no
prediction matches and every one is ignored (it lies on void or group pixels): nothing is left
to rank. That numpy's ``cumsum`` of nothing is ``[0]``, with which the function scores the class
AP 0, as it does a class with ground truth and no prediction (the ground truth all missed).
"""

from __future__ import annotations

import importlib
import json
import sys
import types

import numpy

INTERNAL_PREFIX = "deeplearning.projects.cityscapesApi"
# The public modules the instance evaluator imports under the internal prefix, parents first.
ALIASED_MODULES = (
    "cityscapesscripts",
    "cityscapesscripts.helpers",
    "cityscapesscripts.helpers.labels",
    "cityscapesscripts.evaluation",
    "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling",
)


class LegacyNumpy(types.ModuleType):
    """numpy plus names NumPy 2 removed, for evaluation packages written against older NumPy:
    ``in1d`` (removed in 2.4; cityscapesscripts) and ``float`` (an alias of the builtin,
    removed in 1.24; lvis, see ``detectron2_backend.lvis_eval_for_numpy2``)."""

    float = float

    def __getattr__(self, name: str):
        return getattr(numpy, name)

    @staticmethod
    def in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> numpy.ndarray:
        return numpy.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()


class CityscapesNumpy(LegacyNumpy):
    """``LegacyNumpy`` for cityscapesscripts' instance evaluation: ``cumsum`` of an empty array
    is ``[0]`` (the module docstring; ``evaluateMatches`` calls it once, on the sorted true
    labels, and reads its last element as the number of true examples)."""

    @staticmethod
    def cumsum(a, *args, **kwargs) -> numpy.ndarray:
        result = numpy.cumsum(a, *args, **kwargs)
        return result if result.size else numpy.zeros(1, dtype=result.dtype)


def _json_default(value: object) -> object:
    return value.item() if isinstance(value, numpy.generic) else value.__dict__


def write_dict_to_json(data: dict, path: str) -> None:
    """cityscapesscripts' ``writeDict2JSON`` (same layout), with numpy scalars as numbers."""
    with open(path, "w") as handle:
        handle.write(json.dumps(data, default=_json_default, sort_keys=True, indent=4))


def alias_cityscapes_scripts() -> None:
    """Make ``INTERNAL_PREFIX.<module>`` resolve to ``<module>`` for ``ALIASED_MODULES``.

    Raises ModuleNotFoundError naming the package when ``cityscapesscripts`` is missing.
    Idempotent; never replaces a module that is already importable under the internal name.
    Also gives the instance evaluation module its NumPy 2 fixes (module docstring).
    """
    try:
        modules = [importlib.import_module(name) for name in ALIASED_MODULES]
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "the Cityscapes evaluator needs the 'cityscapesscripts' package (pip install cityscapesscripts)"
        ) from error
    parts = INTERNAL_PREFIX.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        sys.modules.setdefault(name, types.ModuleType(name))
    for name, module in zip(ALIASED_MODULES, modules):
        sys.modules.setdefault(f"{INTERNAL_PREFIX}.{name}", module)
    evaluation = modules[-1]
    if getattr(evaluation, "np", None) is numpy:
        evaluation.np = CityscapesNumpy("numpy")
    evaluation.writeDict2JSON = write_dict_to_json
