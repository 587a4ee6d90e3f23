import math

import numpy as np
import pytest
import torch
from PIL import Image

from regioncl.augment import BYOL_RECIPES
from regioncl.methods import StepInfo, get_method
from regioncl.methods.byol import Byol, ByolParams

CROP = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _method(base_momentum: float = 0.99) -> Byol:
    torch.manual_seed(0)
    return Byol(ByolParams(hidden_dim=64, feature_dim=16, base_momentum=base_momentum, crop_size=CROP), arch="resnet18")


def _batch(method: Byol, size: int) -> dict:
    samples = []
    for i in range(size):
        pixels = np.random.default_rng(i).integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
        sample = {"key": f"k{i}", "image": Image.fromarray(pixels), "boxes": np.zeros((0, 4), np.float32)}
        samples.append(method.make_views(sample, np.random.default_rng(i)))
    return method.collate(samples)


def _step(step: int, total: int) -> StepInfo:
    return StepInfo(step=step, epoch=0, steps_per_epoch=total, total_steps=total, seed=0)


def test_registry_names_byol_with_paper_defaults():
    assert get_method("byol") is Byol
    assert ByolParams() == ByolParams(feature_dim=256, hidden_dim=4096, base_momentum=0.99, crop_scale=(0.08, 1.0))


def test_recipes_are_byols_asymmetric_pair():
    first, second = BYOL_RECIPES
    assert (first.blur_probability, first.solarize_probability) == (1.0, 0.0)
    assert (second.blur_probability, second.solarize_probability) == (0.1, 0.2)
    for recipe in BYOL_RECIPES:
        assert (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (recipe.jitter_probability, recipe.grayscale_probability) == (0.8, 0.2)


def test_momentum_follows_the_cosine_schedule_hand_values():
    method = _method(base_momentum=0.99)
    # tau_k = 1 - 0.01 * (cos(pi k / 4) + 1) / 2
    expected = [0.99, 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, 0.995, 1 - 0.01 * (math.cos(3 * math.pi / 4) + 1) / 2, 1.0]
    assert [method.momentum_at(_step(k, 4)) for k in range(5)] == pytest.approx(expected)


def test_heads_are_byols_mlps_and_the_target_has_no_predictor():
    method = _method()
    assert [type(m).__name__ for m in method.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (method.projector[0].out_features, method.projector[-1].out_features) == (64, 16)
    assert (method.predictor[0].in_features, method.predictor[-1].out_features) == (16, 16)
    targets = {id(target) for _, target in method.momentum_pairs()}
    assert targets == {id(method.backbone_target), id(method.projector_target)}
    assert all(not p.requires_grad for p in method.backbone_target.parameters())


def _moved_target(method: Byol) -> Byol:
    """The method with its target moved off the online network (they start equal), so that
    using the wrong network for a view changes the numbers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*method.backbone_target.parameters(), *method.projector_target.parameters()]:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return method


def _hand_byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2: mean_i || p_i/||p_i|| - z_i/||z_i|| ||^2 (= 2 - 2 cos)."""
    return ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()


def _online_predictions_and_target_projections(method: Byol, batch: dict) -> tuple[list, list]:
    """[p1, p2] from the online network with its predictor; [z1, z2] from the target, no gradient."""
    p = [method.predictor(method.projector(method.backbone(batch[v]))) for v in ("view1", "view2")]
    with torch.no_grad():
        z = [method.projector_target(method.backbone_target(batch[v])) for v in ("view1", "view2")]
    return p, z


def test_loss_pairs_each_views_prediction_with_the_other_views_target_projection():
    method = _moved_target(_method())
    batch = _batch(method, 4)
    loss = method(batch, _step(0, 4))["loss"]
    with torch.no_grad():  # the same modules on the same views (BN in train mode: the same batch statistics)
        (p1, p2), (z1, z2) = _online_predictions_and_target_projections(method, batch)
    torch.testing.assert_close(loss, _hand_byol(p1, z2) + _hand_byol(p2, z1), rtol=1e-5, atol=1e-6)
    # Not a vacuous pairing: the same-view loss is another number.
    assert abs(loss.item() - (_hand_byol(p1, z1) + _hand_byol(p2, z2)).item()) > 1e-3


def test_gradient_is_the_formulas_through_the_online_network_only():
    method = _moved_target(_method())
    batch = _batch(method, 4)
    method(batch, _step(0, 4))["loss"].backward()
    online = [*method.backbone.parameters(), *method.projector.parameters(), *method.predictor.parameters()]
    actual = [p.grad for p in online]
    method.zero_grad()
    (p1, p2), (z1, z2) = _online_predictions_and_target_projections(method, batch)  # z: stop-gradient
    expected = torch.autograd.grad(_hand_byol(p1, z2) + _hand_byol(p2, z1), online)
    # Relative to the whole gradient's norm: the two loss forms round differently, and a bias
    # feeding a BN has a true gradient of 0, i.e. pure rounding noise in both.
    got, want = torch.cat([g.flatten() for g in actual]), torch.cat([g.flatten() for g in expected])
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    target = [*method.backbone_target.parameters(), *method.projector_target.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target)


def test_one_step_moves_online_by_its_gradient_and_target_by_the_ema():
    method = _method(base_momentum=0.9)
    info = _step(1, 4)
    tau = 1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2
    online_before = [p.detach().clone() for p in method.backbone.parameters()]
    target_before = [p.detach().clone() for p in method.backbone_target.parameters()]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(_batch(method, 4), info)["loss"].backward()
    grads = [p.grad.clone() for p in method.backbone.parameters()]
    assert all(p.grad is None for p in method.backbone_target.parameters())
    optimizer.step()
    method.update_momentum(info)
    for before, grad, after in zip(online_before, grads, method.backbone.parameters()):
        torch.testing.assert_close(after.detach(), before - 0.5 * grad)
    for t_old, t_new, online in zip(target_before, method.backbone_target.parameters(), method.backbone.parameters()):
        torch.testing.assert_close(t_new, t_old * tau + online.detach() * (1 - tau))
