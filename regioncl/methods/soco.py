"""SoCo (Wei et al. 2021, "Aligning Pretraining for Detection via Object-Level Contrastive Learning").

BYOL on selective-search boxes, encoded by the detector's own parts:

    h = f^H(RoIAlign(f^I(V), b))                                                     (eq. 1)
    v_i = q(g(h_i)) online on V1;  v'_i = g'(h'_i), v''_i = g'(h''_i) target on V2, V3 (eqs. 2-4)
    L_i = -2 cos(v_i, v'_i) - 2 cos(v_i, v''_i),   L = (1/K) sum_i L_i                (eqs. 5, 6)
    L_SoCo = L + L~    (L~: V1 through the target, V2 and V3 through the online network)
    xi <- tau xi + (1 - tau) theta,  tau = 1 - (1 - 0.99) (cos(pi k / K) + 1) / 2

Each directional term l(a->b) is ``byol_loss(p_a, z_b, mask)``: the mean of 2 - 2 cos over the
boxes of the global batch present in both views, so the total is the paper's plus 2 per term
(the same gradients). Registered variants ([P] paper, [C] released code, hologerry/SoCo):

- ``soco`` (SoCo-R50-FPN): f^I = ResNet + FPN P2-P5 (no P6), f^H = the 4conv1fc box head
  (1024-d), one shared by all levels; each box RoIAligned (7 x 7 [C], aligned) on the level its
  sqrt(area) *in that view* selects: <= 48, 96, 192 px -> P2, P3, P4, else P5 [P], thresholds
  scaled with ``view_size`` / 224, so V3 (V2 at half size) lands a level lower. Views V1-V3;
  ``star: true`` adds V4 (SoCo*, [P sec. 4.3]).
- ``soco_c4`` (SoCo-R50-C4): RoIAlign (14 x 14 [C]) on C4, res5 + global average pooling as the
  head, V1 and V2 only [P].

Views [P sec. 3.2]: V1 = the whole image resized to ``view_size`` (aspect not kept); V2 = a random
crop of V1 (area ``crop_scale``, aspect ``crop_ratio`` [C]) resized to ``view_size``; V3 = V2
down-sampled to ``small_view_size``; V4 = another crop of V1 at ``star_view_size``. Every view
is flipped independently and gets BYOL's photometric recipe (``BYOL_RECIPES``: the first for V1,
the second for the others), without BYOL's crop. K = ``num_boxes`` proposals are sampled per
image among those visible in V2 (fixed-K: duplicates when fewer [C]); the same K box ids are
located in every view, so row k of every view is one proposal. Box jitter [P] moves V1's copy
only (as [C]; the paper does not say which copy, its pseudocode in the spec jitters V1's).

Random draws, all in ``make_views`` from the sample's rng, in this order: V1's flip; V2's crop
and flip (up to ``crop_tries`` draws); V3 (its flip, or its crop and flip), V4's crop and flip;
the K proposals; V1's jitter; the photometric draws of V1, V2, V3, V4.

Choices where the paper is silent or differs from [C] (the options name the alternative):
- ``box_visibility`` "inside" [P, "proposals outside of V2 are dropped"]: a proposal counts in a
  view only when it lies wholly inside it, so matched boxes cover one source region in every
  view; "overlap" [C]: any overlap, and each view's copy is clipped to that view.
- ``crop_tries`` 5 [C]: V2 is redrawn until a proposal is visible in it. When none is after the
  last try, the box is V2's crop itself (visible in V1, V2 and V3 alike) [spec decision: [C]
  uses each view's whole frame, which pairs different regions].
- ``small_view`` "downsample" [P]; "independent" [C, SoCo-FPN 100/400 ep]: V3 is its own crop
  of V1. The K boxes stay those drawn for V2; in an independent V3 (and in V4) a box that is not
  visible there drops out of that pair's loss ([C] draws a proposal sample per view pair).
- ``jitter_style`` "center" [P]: one r moves centre and size; "corner" [C]: four r's, top-left
  anchor. Jitter is drawn in source px and clipped to the image.
- ``roi_levels`` "assigned" [P, spec decision 9.8]: each box pooled on its level only;
  "all" [C]: every box on every level through the head (its BN statistics over all of them),
  the assigned level's output kept. Not equivalent with a BN head.
- Norms: ``fpn_norm`` and ``head_norm`` "bn" ([C]; [P sec. 4.2] finetunes with SyncBN in all
  layers, so the transferred layers must have them); with ``sync_bn: true`` they are SyncBN. A
  detector loads the FPN only with the same norm (``regioncl.transfer``).
- Boxes that are padding (collation) never enter the network; boxes hidden in V4 or an
  independent V3 enter it (clipped to the view) and only the loss drops them.
- Loss normalisation: the mean over the valid (image, box) pairs of the global batch, equal to
  the paper's mean over K then over images when every image has its K boxes.
- Not implemented from [C]: cutout inside boxes (not in the paper) and the zero-initialised
  last BN of each block. LARS's warm-up from lr/100 and cosine floor of 1e-6 are engine
  settings (``warmup_start_factor``, ``final_lr``), set by the SoCo runs of config/paper.yaml.

``transfer_state``: the backbone, plus the FPN and the box head for ``soco`` (the paper's "all
pretrained weights except for projection and prediction"); res5 is in the C4 backbone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from regioncl.augment import BYOL_RECIPES, augmented_view
from regioncl.geometry import (
    View,
    boxes_inside,
    boxes_overlap,
    clip_boxes,
    jitter_boxes,
    map_boxes,
    random_resized_crop,
    sample_fixed_k,
)
from regioncl.losses import byol_loss
from regioncl.methods.base import PretrainMethod, StepInfo, register_method
from regioncl.models import FPN, ConvFCBoxHead, MLPHead, ResNetBackbone, cosine_momentum, make_target
from regioncl.models.roi import assign_levels, multilevel_roi_align, roi_align_boxes
from regioncl.settings import bounded

VIEWS = ("view1", "view2", "view3", "view4")
LEVELS = (2, 3, 4, 5)  # P2..P5
PAPER_VIEW = 224  # the view size SoCo's level thresholds are given for
LEVEL_CANONICAL = 192  # sqrt(area) <= 48 / 96 / 192 px -> P2 / P3 / P4, else P5 (assign_levels, ceil)


@dataclass(frozen=True)
class SocoC4Params:
    """SoCo-R50-C4, and the fields every SoCo variant shares."""

    view_size: int = bounded(224, ge=1)  # V1 and V2 px [P]
    crop_scale: tuple[float, float] = (0.5, 1.0)  # V2's area fraction of V1 [P]; [C] C4: (0.6, 1)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # V2's aspect range, in V1 px [C]
    crop_tries: int = bounded(5, ge=1)  # V2 draws until a proposal is visible [C]
    num_boxes: int = bounded(4, ge=1)  # K [P]
    box_visibility: Literal["inside", "overlap"] = "inside"
    jitter_style: Literal["center", "corner"] = "center"
    jitter_ratio: float = bounded(0.1, ge=0, lt=1)  # r ~ U[-0.1, 0.1] [P]
    jitter_probability: float = bounded(0.5, ge=0, le=1)  # [P]
    roi_size: int = bounded(14, ge=1)  # RoIAlign output [C]
    feature_dim: int = bounded(256, ge=1)  # projector/predictor output [P]
    hidden_dim: int = bounded(4096, ge=1)  # [P]
    base_momentum: float = bounded(0.99, ge=0, le=1)  # tau_base, rising to 1 [P]


@dataclass(frozen=True)
class SocoParams(SocoC4Params):
    """SoCo-R50-FPN: SoCo-C4's fields, plus V3, V4 and the FPN and box head."""

    roi_size: int = bounded(7, ge=1)  # [C]
    small_view_size: int = bounded(112, ge=1)  # V3 px [P]
    small_view: Literal["downsample", "independent"] = "downsample"
    star: bool = False  # SoCo*: the extra view V4 [P sec. 4.3]
    star_view_size: int = bounded(192, ge=1)  # V4 px [P]
    fpn_channels: int = bounded(256, ge=1)  # [C]; also the head's conv width, as detectron2's CONV_DIM
    head_dim: int = bounded(1024, ge=1)  # the box head's fc [C]
    fpn_norm: Literal["none", "bn", "gn"] = "bn"  # [C]
    head_norm: Literal["none", "bn", "gn"] = "bn"  # the box head's convs [C]
    roi_levels: Literal["assigned", "all"] = "assigned"


@dataclass(frozen=True)
class SocoGeometry:
    """One sample's views and its K proposals located in each of them."""

    views: dict[str, View]  # "view1", "view2", ...
    source_boxes: np.ndarray  # (K, 4) x1y1x2y2 source px: the sampled proposals, before jitter
    boxes: dict[str, np.ndarray]  # view -> (K, 4) view px, clipped to the view (V1's jittered)
    visible: dict[str, np.ndarray]  # view -> (K,) bool: the box counts in this view (box_visibility)


class C4ObjectEncoder(nn.Module):
    """SoCo-R50-C4's h = f^H(RoIAlign(f^I(V), b)): RoIAlign on C4, res5 and global average pooling as f^H."""

    def __init__(self, arch: str, params: SocoC4Params) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(arch)
        self.roi_size = params.roi_size
        self.out_channels = self.backbone.out_channels

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) + (B, K, 4) view px + (B, K) bool -> (n, C5): the n present boxes, in (image, box) order."""
        c4 = self.backbone.forward_stages(images, until="c4")["c4"]
        pooled = roi_align_boxes(c4, boxes, self.roi_size, stride=16)  # (B, K, C4, S, S)
        return self.backbone.layer4(pooled[present]).mean(dim=(2, 3))


class FpnObjectEncoder(nn.Module):
    """SoCo-R50-FPN's h = f^H(RoIAlign(f^I(V), b)): FPN P2-P5, scale-aware level, the 4conv1fc box head as f^H."""

    def __init__(self, arch: str, params: SocoParams) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(arch)
        self.fpn = FPN(self.backbone.stage_channels, params.fpn_channels, in_levels=LEVELS, norm=params.fpn_norm)
        self.box_head = ConvFCBoxHead(
            params.fpn_channels, conv_dim=params.fpn_channels, fc_dim=params.head_dim, input_size=params.roi_size, norm=params.head_norm
        )
        self.roi_size = params.roi_size
        self.canonical_size = LEVEL_CANONICAL * params.view_size / PAPER_VIEW  # scaled by V2, never per view
        self.all_levels = params.roi_levels == "all"
        self.out_channels = params.head_dim

    def forward(self, images: torch.Tensor, boxes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) + (B, K, 4) view px + (B, K) bool -> (n, head_dim): the n present boxes, in (image, box) order."""
        pyramid = self.fpn(self.backbone.forward_stages(images))  # {"p2": (B, C, S/4, S/4), ..., "p5"}
        levels = assign_levels(boxes, LEVELS, canonical_size=self.canonical_size, rounding="ceil")  # (B, K)
        if not self.all_levels:
            return self.box_head(multilevel_roi_align(pyramid, boxes, levels, self.roi_size)[present])
        pooled = torch.stack(
            [roi_align_boxes(pyramid[f"p{level}"], boxes, self.roi_size, stride=2**level) for level in LEVELS], dim=2
        )  # (B, K, L, C, S, S)
        on_present = pooled[present]  # (n, L, C, S, S)
        heads = self.box_head(on_present.flatten(0, 1)).view(on_present.shape[0], len(LEVELS), -1)  # (n, L, D)
        rows = torch.arange(heads.shape[0], device=heads.device)
        return heads[rows, levels[present] - LEVELS[0]]


class _Soco(PretrainMethod):
    """What both SoCo variants share: views and boxes, BYOL heads, the symmetric loss over view pairs."""

    Encoder: ClassVar[type[nn.Module]]
    ragged_keys = frozenset(f"{view}_{kind}" for view in VIEWS for kind in ("boxes", "visible"))

    def __init__(self, params: SocoC4Params, *, arch: str) -> None:
        super().__init__(params, arch=arch)
        self.encoder = self.Encoder(arch, params)
        mlp = dict(num_layers=2, batch_norm=True)
        self.projector = MLPHead(self.encoder.out_channels, params.hidden_dim, params.feature_dim, **mlp)
        self.predictor = MLPHead(params.feature_dim, params.hidden_dim, params.feature_dim, **mlp)
        self.encoder_target = make_target(self.encoder)
        self.projector_target = make_target(self.projector)

    # -- views -------------------------------------------------------------------------------

    def _crop_of(self, v1_frame: View, size: int, rng: np.random.Generator) -> View:
        """A random crop of V1 (``crop_scale``, ``crop_ratio`` in V1 px) resized to ``size`` px, flipped with p = 0.5."""
        params = self.params
        inner = random_resized_crop(v1_frame.out_w, v1_frame.out_h, size, rng, scale=params.crop_scale, ratio=params.crop_ratio)
        return v1_frame.subview(inner)

    def _visible(self, boxes: np.ndarray, view: View) -> np.ndarray:
        """(K, 4) view px -> (K,) bool, by ``box_visibility``."""
        if self.params.box_visibility == "inside":
            return boxes_inside(boxes, view)
        return boxes_overlap(boxes, view)

    def _more_views(self, v1_frame: View, v2: View, rng: np.random.Generator) -> dict[str, View]:
        """Views after V1 and V2 (none for SoCo-C4)."""
        return {}

    def draw_geometry(self, sample: dict[str, Any], rng: np.random.Generator) -> SocoGeometry:
        """The views of ``sample`` and its K proposals in each (all draws but the photometric ones)."""
        params = self.params
        width, height = sample["image"].size
        proposals = np.asarray(sample["boxes"], dtype=np.float64).reshape(-1, 4)  # (P, 4) source px
        source = View.identity(width, height)
        v1_frame = source.resized(params.view_size)  # V1 before its flip: crops of V1 are drawn in its px
        views = {"view1": dataclasses.replace(v1_frame, flip=bool(rng.random() < 0.5))}
        for _ in range(params.crop_tries):
            v2 = self._crop_of(v1_frame, params.view_size, rng)
            candidates = np.flatnonzero(self._visible(map_boxes(proposals, source, v2), v2))
            if candidates.size:
                break
        views["view2"] = v2
        views.update(self._more_views(v1_frame, v2, rng))
        if candidates.size:
            chosen = proposals[candidates[sample_fixed_k(candidates.size, params.num_boxes, rng)]]  # (K, 4)
        else:
            chosen = np.repeat(np.array([v2.crop], dtype=np.float64), params.num_boxes, axis=0)
        corner = params.jitter_style == "corner"
        jittered = jitter_boxes(
            chosen, source, rng, ratio=params.jitter_ratio, probability=params.jitter_probability,
            independent=corner, anchor="corner" if corner else "center",
        )  # fmt: skip
        boxes, visible = {}, {}
        for name, view in views.items():
            in_view = map_boxes(jittered if name == "view1" else chosen, source, view)
            visible[name] = self._visible(in_view, view)
            boxes[name] = clip_boxes(in_view, view, min_size=0.0)[0]
        return SocoGeometry(views=views, source_boxes=chosen, boxes=boxes, visible=visible)

    def make_views(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """{"view1": (3, S, S), ..., "view1_boxes": (K, 4) float32 view px, "view1_visible": (K,) bool, ...}."""
        geometry = self.draw_geometry(sample, rng)
        out = {}
        for index, (name, view) in enumerate(geometry.views.items()):
            recipe = BYOL_RECIPES[min(index, 1)]  # V1: the first recipe; V2-V4: the second
            out |= augmented_view(name, sample["image"], view, recipe, rng)
            out[f"{name}_boxes"] = torch.as_tensor(geometry.boxes[name], dtype=torch.float32)
            out[f"{name}_visible"] = torch.as_tensor(geometry.visible[name])
        return out

    # -- training ----------------------------------------------------------------------------

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.encoder_target), (self.projector, self.projector_target)]

    def momentum_at(self, step_info: StepInfo) -> float:
        return cosine_momentum(step_info.step, base_momentum=self.params.base_momentum, total_steps=step_info.total_steps)

    @staticmethod
    def _per_box(rows: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """(n, D) rows of the present boxes -> (B, K, D), zeros at padding."""
        dense = rows.new_zeros((*present.shape, rows.shape[-1]))
        dense[present] = rows
        return dense

    def forward(self, batch: dict[str, torch.Tensor], step_info: StepInfo) -> dict[str, torch.Tensor]:
        names = [name for name in VIEWS if name in batch]
        predictions, projections = {}, {}  # view -> (B, K, D): online q(g(h)), target g'(h')
        for name in names:  # one pass per view: BN statistics are per view, as in BYOL
            present = batch[f"{name}_boxes_mask"]  # (B, K): rows that are boxes, not padding
            images, boxes = batch[name], torch.where(present[..., None], batch[f"{name}_boxes"], 0.0)  # padding: zero boxes
            predictions[name] = self._per_box(self.predictor(self.projector(self.encoder(images, boxes, present))), present)
            with torch.no_grad():
                projections[name] = self._per_box(self.projector_target(self.encoder_target(images, boxes, present)), present)
        first = names[0]
        terms = {}
        for other in names[1:]:
            both = batch[f"{first}_visible"] & batch[f"{other}_visible"]  # (B, K); padding is False
            terms[f"loss_{first}_{other}"] = byol_loss(predictions[first], projections[other], both)  # L
            terms[f"loss_{other}_{first}"] = byol_loss(predictions[other], projections[first], both)  # L~
        return {"loss": sum(terms.values()), **terms, "projection_std": _spread(projections[first], batch[f"{first}_boxes_mask"])}


def _spread(projections: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Collapse gauge: the std over present boxes of the L2-normalized projections, averaged over dims
    (1/sqrt(D) when spread evenly, 0 when collapsed). (B, K, D) + (B, K) -> scalar, this rank's boxes."""
    with torch.no_grad():
        unit = nn.functional.normalize(projections[present], dim=-1)  # (n, D)
        count = max(unit.shape[0], 1)
        mean = unit.sum(dim=0) / count
        return ((unit - mean).square().sum(dim=0) / count).sqrt().mean()


@register_method("soco_c4")
class SocoC4(_Soco):
    Params = SocoC4Params
    Encoder = C4ObjectEncoder
    pixel_params = ("view_size",)

    def transfer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        return self.encoder.backbone.state_dict(), {}


@register_method("soco")
class Soco(_Soco):
    Params = SocoParams
    Encoder = FpnObjectEncoder
    pixel_params = ("view_size", "small_view_size", "star_view_size")

    def _more_views(self, v1_frame: View, v2: View, rng: np.random.Generator) -> dict[str, View]:
        """V3 (V2 down-sampled, or its own crop of V1) and, for SoCo*, V4 (a crop of V1)."""
        params = self.params
        if params.small_view == "downsample":
            views = {"view3": dataclasses.replace(v2.resized(params.small_view_size), flip=bool(rng.random() < 0.5))}
        else:
            views = {"view3": self._crop_of(v1_frame, params.small_view_size, rng)}
        if params.star:
            views["view4"] = self._crop_of(v1_frame, params.star_view_size, rng)
        return views

    def transfer_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        encoder = self.encoder
        return encoder.backbone.state_dict(), {"fpn": encoder.fpn.state_dict(), "box_head": encoder.box_head.state_dict()}
