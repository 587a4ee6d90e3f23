import math

import pytest
import torch

from regioncl.losses import byol_loss, info_nce


def test_info_nce_matches_hand_computed_value():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits / tau = [0.6, 0.0, -1.0] / 0.5 = [1.2, 0.0, -2.0]; the positive is the first.
    expected = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0) + math.exp(-2.0)))
    assert info_nce(q, k, queue, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_averages_over_the_batch():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0]])
    # row 0: logits [1, 0] -> -log(e/(e+1)); row 1: logits [0, 1] -> -log(1/(1+e)).
    expected = (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e))) / 2
    assert info_nce(q, k, queue, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_byol_loss_matches_hand_computed_value_and_stops_target_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0]], requires_grad=True)
    loss = byol_loss(p, z)  # row 0: cos 0 -> 2; row 1: cos 1 -> 0
    assert loss.item() == pytest.approx(1.0, rel=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None

