import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from regioncl.methods import StepInfo, get_method
from regioncl.methods.moco_v2 import MocoV2, MocoV2Params

CROP = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _method(queue_size: int = 16, momentum: float = 0.9) -> MocoV2:
    torch.manual_seed(0)
    params = MocoV2Params(queue_size=queue_size, momentum=momentum, hidden_dim=64)
    return MocoV2(params, arch="resnet18", crop_size=CROP)


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


def test_forward_gives_finite_loss_with_gradients_only_on_the_query_encoder():
    method = _method()
    loss = method(_batch(method, 4), STEP)["loss"]
    assert torch.isfinite(loss) and loss.ndim == 0
    loss.backward()
    online = list(method.backbone.parameters()) + list(method.head.parameters())
    target = list(method.backbone_k.parameters()) + list(method.head_k.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online[-4:])
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
