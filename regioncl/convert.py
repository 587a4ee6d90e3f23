"""Pretrained checkpoint -> detector weights for torchvision and detectron2.

Every renaming lives in ``KEY_MAPS``: per target framework, per transferred module, an ordered
list of regex rules (first full match wins). A rule with template ``None`` drops the key on
purpose (e.g. BatchNorm's ``num_batches_tracked`` counter, which neither detector uses). A
method that transfers more than the backbone (an FPN, a box head) adds one entry per target.

The conversion is strict: the source backbone must hold exactly the tensors of torchvision's
ResNet of its ``arch`` (shapes included), every tensor must match a rule, and the torchvision
keys must exist with the same shape in torchvision's detection backbone. Any violation raises
``ConversionError`` listing the keys concerned, before anything is written.

The ``supervised`` baseline (``regioncl.baselines``) enters here: an ImageNet-supervised
torchvision ResNet (``SupervisedSource``: torchvision's weights, downloaded, or a local state
dict) is converted by the same rules, its classifier (``fc``) dropped, into the same two files a
pretrained run's checkpoint gives, so both backends finetune from it as from a pretrained run.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from regioncl.archs import ARCHS
from regioncl.baselines import SUPERVISED
from regioncl.weights import (
    check_finite,
    read_classification_state_dict,
    read_pretrained_checkpoint,
    write_detectron2_weights,
    write_torchvision_weights,
)

BN_PARAMS = "weight|bias|running_mean|running_var"
T = TypeVar("T")


@dataclass(frozen=True)
class KeyRule:
    """Rename keys that fully match ``pattern`` to ``template`` (``None``: drop the key).

    The template is ``str.format``-ed with the pattern's named groups; a ``layer`` group
    (torchvision's stage 1..4) also provides ``stage`` = layer + 1 (detectron2's res2..res5),
    and a ``level`` group (torchvision FPN's input index 0..3, from C2) provides ``pyramid`` =
    level + 2 (detectron2's fpn_lateral2..5 / fpn_output2..5).
    """

    pattern: str
    template: str | None

    def apply(self, key: str) -> tuple[bool, str | None]:
        match = re.fullmatch(self.pattern, key)
        if match is None:
            return False, None
        if self.template is None:
            return True, None
        fields = match.groupdict()
        if "layer" in fields:
            fields["stage"] = int(fields["layer"]) + 1
        if "level" in fields:
            fields["pyramid"] = int(fields["level"]) + 2
        return True, self.template.format(**fields)


DROP_BN_COUNTER = KeyRule(r".*\.num_batches_tracked", None)

# detectron2's ResNet: BasicBlock (R18/R34) has conv1..2, Bottleneck (R50+) conv1..3; each
# conv owns its norm as `convN.norm`; the projection shortcut is `shortcut` (+ `.norm`).
DETECTRON2_BACKBONE = (
    DROP_BN_COUNTER,
    KeyRule(r"conv1\.weight", "stem.conv1.weight"),
    KeyRule(rf"bn1\.(?P<param>{BN_PARAMS})", "stem.conv1.norm.{param}"),
    KeyRule(
        r"layer(?P<layer>[1-4])\.(?P<block>\d+)\.conv(?P<conv>[1-3])\.weight",
        "res{stage}.{block}.conv{conv}.weight",
    ),
    KeyRule(
        rf"layer(?P<layer>[1-4])\.(?P<block>\d+)\.bn(?P<conv>[1-3])\.(?P<param>{BN_PARAMS})",
        "res{stage}.{block}.conv{conv}.norm.{param}",
    ),
    KeyRule(
        r"layer(?P<layer>[1-4])\.(?P<block>\d+)\.downsample\.0\.weight",
        "res{stage}.{block}.shortcut.weight",
    ),
    KeyRule(
        rf"layer(?P<layer>[1-4])\.(?P<block>\d+)\.downsample\.1\.(?P<param>{BN_PARAMS})",
        "res{stage}.{block}.shortcut.norm.{param}",
    ),
)

# torchvision's detection models wrap the ResNet as `backbone.body` (IntermediateLayerGetter
# keeps the ResNet's own names). The counter is dropped: FrozenBatchNorm2d has none and
# BatchNorm2d only uses it when momentum is None.
TORCHVISION_BACKBONE = (
    DROP_BN_COUNTER,
    KeyRule(r"(?P<key>(conv1|bn1|layer[1-4])\..+)", "backbone.body.{key}"),
)

# An FPN as torchvision's FeaturePyramidNetwork names it (`inner_blocks` = 1x1 laterals,
# `layer_blocks` = 3x3 outputs, each a Conv2dNormActivation: `.0` the conv, `.1` its norm when
# the FPN is normalised, as SoCo's and ReSim-FPN^T's are). detectron2 names the same convs
# fpn_lateral{2..5} / fpn_output{2..5} with the norm as `.norm`; SoCo's own converter
# (convert_detectron2_Head.py, spec_soco §4) produces these names, found by matching heuristics
# under `backbone.` in the detector.
_FPN_BLOCKS = {"inner": "lateral", "layer": "output"}
DETECTRON2_FPN = (DROP_BN_COUNTER,) + tuple(
    rule
    for source, target in _FPN_BLOCKS.items()
    for rule in (
        KeyRule(rf"{source}_blocks\.(?P<level>[0-3])\.0\.(?P<param>weight|bias)", f"fpn_{target}{{pyramid}}.{{param}}"),
        KeyRule(rf"{source}_blocks\.(?P<level>[0-3])\.1\.(?P<param>{BN_PARAMS})", f"fpn_{target}{{pyramid}}.norm.{{param}}"),
    )
)
TORCHVISION_FPN = (DROP_BN_COUNTER, KeyRule(r"(?P<key>(inner|layer)_blocks\..+)", "backbone.fpn.{key}"))

# SoCo's 4conv1fc box head (regioncl.models.ConvFCBoxHead), named as detectron2's
# FastRCNNConvFCHead names it (conv1..4, each with `.norm` or, without a norm, a bias; then fc1);
# it lives under `roi_heads.box_head.` in the detector. torchvision's FastRCNNConvFCHead is a
# Sequential of 4 Conv2dNormActivation (`.0` conv, `.1` norm), Flatten (4), Linear (5), ReLU.
DETECTRON2_BOX_HEAD = (
    DROP_BN_COUNTER,
    KeyRule(r"conv(?P<conv>[1-4])\.(?P<param>weight|bias)", "box_head.conv{conv}.{param}"),
    KeyRule(rf"conv(?P<conv>[1-4])\.norm\.(?P<param>{BN_PARAMS})", "box_head.conv{conv}.norm.{param}"),
    KeyRule(r"fc1\.(?P<param>weight|bias)", "box_head.fc1.{param}"),
)
TORCHVISION_BOX_HEAD = (
    DROP_BN_COUNTER,
    *(
        rule
        for conv in range(1, 5)
        for rule in (
            KeyRule(rf"conv{conv}\.(?P<param>weight|bias)", f"roi_heads.box_head.{conv - 1}.0.{{param}}"),
            KeyRule(rf"conv{conv}\.norm\.(?P<param>{BN_PARAMS})", f"roi_heads.box_head.{conv - 1}.1.{{param}}"),
        )
    ),
    KeyRule(r"fc1\.(?P<param>weight|bias)", "roi_heads.box_head.5.{param}"),
)

# target framework -> transferred module ("backbone", or a name in the checkpoint's
# `transfer` dict such as "fpn" / "box_head") -> rules.
KEY_MAPS: dict[str, dict[str, tuple[KeyRule, ...]]] = {
    "torchvision": {"backbone": TORCHVISION_BACKBONE, "fpn": TORCHVISION_FPN, "box_head": TORCHVISION_BOX_HEAD},
    "detectron2": {"backbone": DETECTRON2_BACKBONE, "fpn": DETECTRON2_FPN, "box_head": DETECTRON2_BOX_HEAD},
}

# Where each transferred module's tensors land in each target's converted weights (the prefixes
# of the templates above); any other key is the backbone's.
MODULE_PREFIXES: dict[str, dict[str, str]] = {
    "torchvision": {"fpn": "backbone.fpn.", "box_head": "roi_heads.box_head."},
    "detectron2": {"fpn": "fpn_", "box_head": "box_head."},
}


def module_of(key: str, target: str) -> str:
    """The transferred module ("backbone", "fpn", "box_head") a converted ``target`` key belongs to."""
    return next((module for module, prefix in MODULE_PREFIXES[target].items() if key.startswith(prefix)), "backbone")


# A key of an FPN norm layer in each target's converted weights.
FPN_NORM_KEYS = {
    "torchvision": re.compile(r"backbone\.fpn\.(inner|layer)_blocks\.\d+\.1\..+"),
    "detectron2": re.compile(r"fpn_(lateral|output)\d\.norm\..+"),
}


def has_fpn_norm(keys: Collection[str], target: str) -> bool:
    """Whether the FPN among converted ``target`` keys has norm layers after its convs."""
    return any(FPN_NORM_KEYS[target].fullmatch(key) for key in keys)


def select_modules(state: Mapping[str, T], target: str, modules: Collection[str]) -> tuple[dict[str, T], list[str]]:
    """(the converted ``state``'s entries of ``modules``, the keys of the others), e.g. a detector's
    ``BenchmarkSettings.pretrained_modules``: a 2fc detector leaves SoCo's 4conv1fc box head out."""
    kept = {key: value for key, value in state.items() if module_of(key, target) in modules}
    return kept, sorted(set(state) - set(kept))


class ConversionError(ValueError):
    """A checkpoint that cannot be converted completely; the message lists the keys."""


@dataclass(frozen=True)
class ConversionReport:
    arch: str
    method: str
    torchvision_keys: int  # tensors written to the torchvision file
    detectron2_keys: int  # tensors written to the detectron2 file
    dropped: tuple[str, ...]  # source keys dropped on purpose by a rule


def map_keys(
    state: Mapping[str, torch.Tensor], rules: tuple[KeyRule, ...]
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Rename ``state`` by ``rules``; return (renamed state, dropped keys, unmapped keys)."""
    renamed: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    for key, tensor in state.items():
        for rule in rules:
            matched, target = rule.apply(key)
            if matched:
                break
        if not matched:
            unmapped.append(key)
        elif target is None:
            dropped.append(key)
        else:
            renamed[target] = tensor
    return renamed, dropped, unmapped


def reference_backbone_shapes(arch: str) -> dict[str, torch.Size]:
    """Shapes of torchvision's ResNet ``arch`` without the classifier (the source contract)."""
    resnet = getattr(torchvision.models, arch)(weights=None)
    return {k: v.shape for k, v in resnet.state_dict().items() if not k.startswith("fc.")}


def detection_backbone_shapes(arch: str) -> dict[str, torch.Size]:
    """Shapes of the ResNet tensors inside torchvision's detection models (``backbone.body.*``)."""
    backbone = resnet_fpn_backbone(backbone_name=arch, weights=None)
    return {
        f"backbone.{k}": v.shape for k, v in backbone.state_dict().items() if k.startswith("body.")
    }


def shape_problems(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str
) -> list[str]:
    """Human-readable lines for keys missing from / unexpected in / mis-shaped in ``actual``."""
    problems = [f"{what}: missing {k}" for k in sorted(set(expected) - set(actual))]
    problems += [f"{what}: unexpected {k}" for k in sorted(set(actual) - set(expected))]
    problems += [
        f"{what}: {k} has shape {tuple(actual[k].shape)}, expected {tuple(expected[k])}"
        for k in sorted(set(actual) & set(expected))
        if actual[k].shape != expected[k]
    ]
    return problems


def without_bn_counters(state: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}


def convert_modules(
    modules: Mapping[str, Mapping[str, torch.Tensor]], target: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Map every module's tensors for ``target``; return (state, dropped keys, problems)."""
    state: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    problems: list[str] = []
    for module, module_state in modules.items():
        rules = KEY_MAPS[target].get(module)
        if rules is None:
            problems.append(
                f"{target}: no key map for transferred module {module!r} (add it to KEY_MAPS)"
            )
            continue
        renamed, module_dropped, unmapped = map_keys(module_state, rules)
        collisions = sorted(set(renamed) & set(state))
        problems += [f"{target}: {module}.{k} has no rule" for k in unmapped]
        problems += [f"{target}: two modules map to {k}" for k in collisions]
        dropped += [f"{module}.{k}" for k in module_dropped]
        state.update(renamed)
    return state, dropped, problems


def convert_checkpoint(
    checkpoint: Path, torchvision_out: Path, detectron2_out: Path
) -> ConversionReport:
    """Write the torchvision ``.pth`` and detectron2 ``.pkl`` weights of a pretrained checkpoint.

    Raises ``ConversionError`` (nothing written) if any tensor is missing, unexpected, has the
    wrong shape, or has no rule in ``KEY_MAPS``.
    """
    ckpt = read_pretrained_checkpoint(checkpoint)
    modules = {"backbone": ckpt["backbone"], **ckpt["transfer"]}
    return write_converted(modules, ckpt["method"], ckpt["arch"], str(checkpoint), torchvision_out, detectron2_out)


TORCHVISION_SOURCE = "torchvision"
# `torchvision` alone: the original ImageNet recipe (90 epochs, 76.1 % top-1 for R50), the weights
# torchvision's own detection models start from and the nearest to the papers' Supervised rows.
DEFAULT_IMAGENET_WEIGHTS = "IMAGENET1K_V1"


@dataclass(frozen=True)
class SupervisedSource:
    """Where the ``supervised`` baseline's ResNet ``arch`` comes from: torchvision's ImageNet
    weights ``torchvision`` (a ``<Arch>_Weights`` member name, e.g. "IMAGENET1K_V1"; downloaded to
    torch's hub cache when converted, hash-checked) or a local state dict ``path``."""

    arch: str
    torchvision: str | None = None
    path: Path | None = None

    @classmethod
    def parse(cls, value: str, arch: str) -> SupervisedSource:
        """``torchvision``, ``torchvision:<weights>`` (e.g. ``torchvision:IMAGENET1K_V2``) or the
        path of a torchvision classification state dict. Raises ValueError saying what is wrong
        (an unknown arch or weights name, a file that does not exist)."""
        if arch not in ARCHS:
            raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
        name, colon, weights = str(value).partition(":")
        if name == TORCHVISION_SOURCE:
            available = torchvision.models.get_model_weights(arch).__members__
            chosen = weights if colon else DEFAULT_IMAGENET_WEIGHTS
            if chosen not in available:
                raise ValueError(f"{value!r}: torchvision has no {arch} weights {chosen!r}; it has {sorted(available)}")
            return cls(arch=arch, torchvision=available[chosen].name)  # DEFAULT -> the member it aliases
        path = Path(value)
        if not path.is_file():
            raise ValueError(
                f"{value!r}: no such file; expected `torchvision`, `torchvision:<weights name>` or the path "
                "of a torchvision classification state dict (.pth)"
            )
        return cls(arch=arch, path=path)

    def __str__(self) -> str:
        """The value ``parse`` reads back: ``torchvision:IMAGENET1K_V1`` or the path."""
        return f"{TORCHVISION_SOURCE}:{self.torchvision}" if self.torchvision else str(self.path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The classification model's state dict (its ``fc`` included), on the CPU."""
        if self.path is not None:
            return read_classification_state_dict(self.path)
        weights = torchvision.models.get_model_weights(self.arch)[self.torchvision]
        return weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)


def convert_supervised(source: SupervisedSource, torchvision_out: Path, detectron2_out: Path) -> ConversionReport:
    """Write the torchvision ``.pth`` and detectron2 ``.pkl`` weights of an ImageNet-supervised
    ResNet, method ``supervised``: what ``convert_checkpoint`` writes for a pretrained run whose
    backbone is that ResNet without its classifier (reported as dropped).

    Raises ``ConversionError`` as ``convert_checkpoint`` does, FloatingPointError for a NaN or inf.
    """
    state = source.state_dict()
    classifier = sorted(k for k in state if k.startswith("fc."))
    backbone = {k: v for k, v in state.items() if k not in classifier}
    check_finite(backbone, str(source))
    return write_converted(
        {"backbone": backbone}, SUPERVISED, source.arch, str(source), torchvision_out, detectron2_out,
        dropped=tuple(classifier),
    )


def write_converted(
    modules: Mapping[str, Mapping[str, torch.Tensor]],
    method: str,
    arch: str,
    where: str,
    torchvision_out: Path,
    detectron2_out: Path,
    dropped: tuple[str, ...] = (),
) -> ConversionReport:
    """Convert ``modules`` (``backbone`` and the transferred ones) of a torchvision ResNet ``arch``
    and write both files; ``where`` (the source) heads the error, ``dropped`` joins the report."""
    problems = shape_problems(
        without_bn_counters(modules["backbone"]),
        without_bn_counters(reference_backbone_shapes(arch)),
        f"backbone vs torchvision {arch}",
    )
    tv_state, mapped_dropped, tv_problems = convert_modules(modules, "torchvision")
    d2_state, _, d2_problems = convert_modules(modules, "detectron2")
    problems += tv_problems + d2_problems
    tv_backbone = {k: v for k, v in tv_state.items() if k.startswith("backbone.body.")}
    problems += shape_problems(
        tv_backbone, detection_backbone_shapes(arch), f"torchvision detection {arch}"
    )
    if problems:
        raise ConversionError(f"{where}: cannot convert:\n  " + "\n  ".join(problems))

    write_torchvision_weights(torchvision_out, arch=arch, method=method, state_dict=tv_state)
    d2_weights = {
        "model": d2_state,
        "__author__": "regioncl",
        "matching_heuristics": True,
        # detectron2's checkpointer returns unknown keys untouched; the backend records them
        "method": method,
        "arch": arch,
    }
    write_detectron2_weights(detectron2_out, d2_weights)
    return ConversionReport(
        arch=arch,
        method=method,
        torchvision_keys=len(tv_state),
        detectron2_keys=len(d2_state),
        dropped=dropped + tuple(mapped_dropped),
    )
