import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.nn import functional as F

from regioncl.methods import StepInfo, get_method
from regioncl.methods.moco_v2 import MocoV2, MocoV2Params

CROP = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _method(queue_size: int = 16, momentum: float = 0.9) -> MocoV2:
    torch.manual_seed(0)
    params = MocoV2Params(queue_size=queue_size, momentum=momentum, hidden_dim=64, crop_size=CROP)
    return MocoV2(params, arch="resnet18")


def _sample(key: str, seed: int) -> dict:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
    return {"key": key, "image": Image.fromarray(pixels), "boxes": np.zeros((0, 4), np.float32), "width": 56, "height": 48}


def _batch(method: MocoV2, size: int, seed: int = 0) -> dict:
    views = [method.make_views(_sample(f"k{i}", seed + i), np.random.default_rng(seed + i)) for i in range(size)]
    return method.collate(views)


STEP = StepInfo(step=0, epoch=0, steps_per_epoch=1, total_steps=1, seed=0)


def test_registry_names_moco_v2():
    assert get_method("moco_v2") is MocoV2
    with pytest.raises(KeyError, match="not_a_method"):
        get_method("not_a_method")


def test_make_views_are_two_normalized_crops_determined_by_the_rng():
    method = _method()
    first = method.make_views(_sample("a", 1), np.random.default_rng(7))
    again = method.make_views(_sample("a", 1), np.random.default_rng(7))
    other = method.make_views(_sample("a", 1), np.random.default_rng(8))
    assert set(first) == {"query", "key"}
    assert first["query"].shape == (3, CROP, CROP) and first["query"].dtype == torch.float32
    assert torch.equal(first["query"], again["query"]) and torch.equal(first["key"], again["key"])
    assert not torch.equal(first["query"], other["query"])


def _moved_key_encoder(method: MocoV2) -> MocoV2:
    """The method with its key encoder moved off the query encoder (they start equal), so that
    using the wrong encoder for a view changes the numbers."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in [*method.backbone_k.parameters(), *method.head_k.parameters()]:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return method


def _hand_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo eq. 1 in logsumexp form: mean_i [ log(exp(q_i.k_i / t) + sum_j exp(q_i.n_j / t)) - q_i.k_i / t ]."""
    positive = (q * k).sum(dim=1) / temperature  # (B,): each query with the key of its own image
    negatives = q @ queue.T / temperature  # (B, K)
    return (torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1) - positive).mean()


def test_loss_is_info_nce_of_each_query_with_its_own_images_key_against_the_queue_before_the_step():
    method = _moved_key_encoder(_method(queue_size=16))
    batch = _batch(method, 4)
    method.queue.pointer.fill_(14)  # the 4 keys wrap around the end: rows 14, 15, 0, 1
    queue_before = method.queue.features.clone()
    loss = method(batch, STEP)["loss"]
    with torch.no_grad():  # the same modules on the same views (BN in train mode: the same batch statistics)
        q = F.normalize(method.head(method.backbone(batch["query"])), dim=1)
        k = F.normalize(method.head_k(method.backbone_k(batch["key"])), dim=1)
    torch.testing.assert_close(loss, _hand_info_nce(q, k, queue_before, 0.2), rtol=1e-5, atol=1e-6)
    # The enqueue comes after the loss: the step's own keys are not its negatives.
    torch.testing.assert_close(method.queue.features[[14, 15, 0, 1]], k)
    assert torch.equal(method.queue.features[2:14], queue_before[2:14])
    assert int(method.queue.pointer) == 2


def test_gradient_is_the_formulas_through_the_query_encoder_only():
    method = _moved_key_encoder(_method())
    batch = _batch(method, 4)
    queue_before = method.queue.features.clone()
    method(batch, STEP)["loss"].backward()
    online = [*method.backbone.parameters(), *method.head.parameters()]
    actual = [p.grad for p in online]
    method.zero_grad()
    q = F.normalize(method.head(method.backbone(batch["query"])), dim=1)
    with torch.no_grad():  # stop-gradient: keys and queue are constants
        k = F.normalize(method.head_k(method.backbone_k(batch["key"])), dim=1)
    expected = torch.autograd.grad(_hand_info_nce(q, k, queue_before, 0.2), online)
    # Relative to the whole gradient's norm: the two loss forms round differently, and a bias
    # feeding a BN has a true gradient of 0, i.e. pure rounding noise in both.
    got, want = torch.cat([g.flatten() for g in actual]), torch.cat([g.flatten() for g in expected])
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    assert any(g.abs().sum() > 0 for g in actual[-4:])
    target = [*method.backbone_k.parameters(), *method.head_k.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in target)


def test_key_encoder_follows_the_ema_formula_after_one_step():
    method = _method(momentum=0.9)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    key_before = [p.detach().clone() for p in method.backbone_k.parameters()]
    method(_batch(method, 4), STEP)["loss"].backward()
    optimizer.step()
    method.update_momentum(STEP)
    for k_old, k_new, q_new in zip(key_before, method.backbone_k.parameters(), method.backbone.parameters()):
        assert torch.equal(k_new, k_old.mul(0.9).add(q_new, alpha=1 - 0.9))  # m * k + (1 - m) * q
    assert any(not torch.equal(k_old, k_new) for k_old, k_new in zip(key_before, method.backbone_k.parameters()))


def test_queue_pointer_advances_wraps_and_stores_the_normalized_keys():
    method = _method(queue_size=6)
    with torch.no_grad():
        first, second = _batch(method, 4, seed=0), _batch(method, 4, seed=10)
        method(first, STEP)
        assert int(method.queue.pointer) == 4
        keys = method._encode_keys(second["key"])  # BN in train mode: batch statistics, as in forward
        method(second, STEP)
    assert int(method.queue.pointer) == 2  # (4 + 4) % 6
    torch.testing.assert_close(method.queue.features[[4, 5, 0, 1]], keys)
    torch.testing.assert_close(method.queue.features.norm(dim=1), torch.ones(6))
    assert "queue.features" in method.state_dict() and "queue.pointer" in method.state_dict()


def test_transfer_state_loads_into_torchvision_resnet18_missing_only_fc():
    backbone, extra = _method().transfer_state()
    result = torchvision.models.resnet18().load_state_dict(backbone, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    assert extra == {}
