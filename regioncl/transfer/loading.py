"""Converted weights into a detector, checked by the same rules in both backends (and into the
probe's bare ResNet, ``regioncl.probe``).

The converted weights (``regioncl.convert``) hold a pretrained ResNet and, for some methods, an
FPN and a box head; a detector takes those of ``BenchmarkSettings.pretrained_modules`` and
starts its other parts (RPN, box predictor, mask head, ...) from random. Loading is refused
before training, naming the weights file and every key concerned, when

- a backbone tensor of the detector is not in the weights (BatchNorm counters aside): a
  detector that silently kept part of its random backbone would score as the method's;
- a tensor of the weights has no place in the detector (an unexpected key);
- a tensor's shape differs from its place's.

What the weights hold and a detector does not take on purpose (another benchmark's modules, FPN
levels it does not have) is left out and named on stderr (``report_left_out``).

The torchvision backend loads by name, so its keys are compared as they are. detectron2 loads a
``.d2.pkl`` by suffix (``detectron2_matches``: its ``align_and_update_state_dicts``) and only
logs what it skipped, so ``detectron2_load_check`` matches the names as it will and checks the
result by the same rules; every rule works on key -> shape mappings (torch and numpy shapes
alike), testable without detectron2.
"""

from __future__ import annotations

import collections
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from regioncl.convert import module_of

Shapes = Mapping[str, Sequence[int]]  # key -> tensor shape (torch.Size, numpy shape or tuple)

# The pretrained ResNet's tensors in a detectron2 detector: stem and res2..res5 blocks under
# ``backbone.bottom_up.`` (FPN) or ``backbone.`` (C4), and C4's res5 under ``roi_heads.``; the
# norm MoCo's C4 head adds after res5 (``roi_heads.res5.norm``) is the head's own.
DETECTRON2_BACKBONE_KEY = re.compile(r"(backbone\.(bottom_up\.)?(stem|res[2-5]\.\d+)|roi_heads\.res5\.\d+)\..+")
# An FPN block's tensor, in the weights (``fpn_lateral2.weight``) or a model (``backbone.fpn_...``).
DETECTRON2_FPN_BLOCK = re.compile(r"(.+\.)?(?P<block>fpn_(lateral|output)\d+)\..+")


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """A state dict's key -> shape (its values torch tensors or numpy arrays)."""
    return {key: tuple(value.shape) for key, value in state.items()}


def load_problems(provided: Shapes, expected: Shapes, required: Collection[str]) -> list[str]:
    """One line per problem of loading ``provided`` into a model of ``expected`` tensors (both
    key -> shape, under the model's names): a ``required`` key not provided, a provided key the
    model lacks, a shape that differs. Empty when the load is complete."""
    problems = [f"missing backbone key {k}" for k in sorted(set(required) - set(provided))]
    problems += [f"unexpected key {k}" for k in sorted(set(provided) - set(expected))]
    problems += [
        f"{k}: shape {tuple(shape)}, the model has {tuple(expected[k])}"
        for k, shape in sorted(provided.items())
        if k in expected and tuple(shape) != tuple(expected[k])
    ]
    return problems


def check_loadable(weights: Path, problems: Sequence[str], into: str = "the detector") -> None:
    """Raise ValueError naming ``weights``, what they go ``into`` and each of ``problems``
    (``load_problems``), if there are any."""
    if problems:
        raise ValueError(f"{weights}: cannot load into {into}:\n  " + "\n  ".join(problems))


def report_left_out(weights: Path, benchmark: str, left_out: Collection[str], target: str) -> None:
    """Say on stderr which modules of the converted ``target`` weights (``"torchvision"`` or
    ``"detectron2"`` keys) the benchmark's detector leaves out, with their tensor counts."""
    if not left_out:
        return
    counts = collections.Counter(module_of(key, target) for key in left_out)
    summary = ", ".join(f"{module} ({count} tensors)" for module, count in sorted(counts.items()))
    print(f"{weights}: left out of {benchmark}'s detector: {summary}", file=sys.stderr)


def detectron2_matches(model_keys: Collection[str], weights_keys: Collection[str]) -> dict[str, str]:
    """detectron2's name matching for weights with ``matching_heuristics`` (its
    ``align_and_update_state_dicts``): each model key takes the longest weights key that is the
    whole of it or a suffix of it starting after a dot (``backbone.bottom_up.stem.conv1.weight``
    takes ``stem.conv1.weight``, never ``m1.weight``). Returns model key -> weights key."""
    available = set(weights_keys)
    matches = {}
    for model_key in model_keys:
        parts = model_key.split(".")
        suffixes = (".".join(parts[start:]) for start in range(len(parts)))  # longest first
        found = next((suffix for suffix in suffixes if suffix in available), None)
        if found is not None:
            matches[model_key] = found
    return matches


def fpn_block(key: str) -> str | None:
    """The detectron2 FPN block (``fpn_lateral3``) a key belongs to; None outside the FPN."""
    match = DETECTRON2_FPN_BLOCK.fullmatch(key)
    return match["block"] if match else None


def detectron2_load_check(model: Shapes, weights: Shapes) -> tuple[list[str], list[str]]:
    """(problems, left out) of loading converted detectron2 ``weights`` into a detectron2
    ``model`` (both key -> shape) as detectron2 will match them (``detectron2_matches``).

    The weights hold a backbone and perhaps an FPN and a box head, so every detection head of
    the model is expected to be missing; the model's ResNet (``DETECTRON2_BACKBONE_KEY``) is
    required. FPN blocks of levels the model's FPN lacks (RetinaNet's FPN starts at C3, the
    weights' at C2) are left out; any other weights key without a place, a key matching two
    places, or a shape that differs is a problem (``load_problems``'s lines, model names)."""
    matches = detectron2_matches(model, weights)
    places = collections.defaultdict(list)
    for model_key, weights_key in matches.items():
        places[weights_key].append(model_key)
    problems = [f"ambiguous key {k}: matches {sorted(keys)}" for k, keys in sorted(places.items()) if len(keys) > 1]
    unplaced = sorted(set(weights) - set(places))
    model_blocks = {fpn_block(k) for k in model}
    left_out = [k for k in unplaced if fpn_block(k) is not None and fpn_block(k) not in model_blocks]
    provided = {model_key: weights[weights_key] for model_key, weights_key in matches.items()}
    provided |= {k: weights[k] for k in unplaced if k not in left_out}  # unexpected, by the weights' name
    required = [k for k in model if DETECTRON2_BACKBONE_KEY.fullmatch(k) and not k.endswith(".num_batches_tracked")]
    return problems + load_problems(provided, model, required), left_out
