import math
import socket

import pytest
import torch
from torch.nn import functional as F

from regioncl.losses import affinity_distillation, byol_loss, info_nce, point_contrast


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



# --- masked losses: the masking rule shared by every method ---------------------------------

def test_masked_info_nce_matches_hand_computed_value_over_the_valid_rows():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0]])
    mask = torch.tensor([True, True, False])
    # rows 0 and 1 as in the unmasked test above (tau 1); row 2 is not counted
    expected = (-math.log(math.e / (math.e + 1)) - math.log(1 / (1 + math.e))) / 2
    assert info_nce(q, k, negatives, temperature=1.0, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_info_nce_takes_region_rows_with_any_leading_shape_and_a_negative_bank_of_any_size():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 3, 8), dim=-1)  # (B, K, D) region queries
    k = F.normalize(torch.randn(2, 3, 8), dim=-1)
    negatives = F.normalize(torch.randn(50, 8), dim=-1)  # (M, D), e.g. densely pooled key maps
    mask = torch.tensor([[True, False, True], [True, True, False]])
    flat = info_nce(q[mask], k[mask], negatives, 0.2)  # the valid rows alone, unmasked
    assert info_nce(q, k, negatives, 0.2, mask=mask).item() == pytest.approx(flat.item(), rel=1e-6)


def test_masked_rows_change_neither_the_loss_nor_the_valid_rows_gradients():
    torch.manual_seed(0)
    valid = torch.tensor([True, False, True, False])
    base_q = F.normalize(torch.randn(4, 8), dim=1)
    k = F.normalize(torch.randn(4, 8), dim=1)
    negatives = F.normalize(torch.randn(6, 8), dim=1)
    results = []
    for garbage in (0.0, 1e3):
        q = base_q.clone()
        q[~valid] = garbage  # whatever finite values padded rows hold
        q.requires_grad_(True)
        loss = info_nce(q, k, negatives, 0.2, mask=valid) + byol_loss(q, k, mask=valid)
        loss.backward()
        results.append((loss.detach(), q.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert (results[0][1][~valid] == 0).all()


def test_all_empty_mask_gives_zero_loss_and_zero_gradients_for_every_parameter():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 8)
    q = F.normalize(encoder(torch.randn(5, 4)), dim=1)
    k = F.normalize(torch.randn(5, 8), dim=1)
    nothing = torch.zeros(5, dtype=torch.bool)
    loss = info_nce(q, k, F.normalize(torch.randn(7, 8), dim=1), 0.2, mask=nothing) + byol_loss(q, k, mask=nothing)
    assert loss.item() == 0.0
    loss.backward()
    for parameter in encoder.parameters():
        assert parameter.grad is not None and torch.equal(parameter.grad, torch.zeros_like(parameter))


def test_info_nce_reaches_its_lower_bound_at_a_perfect_match_and_never_goes_below():
    q = F.normalize(torch.tensor([[1.0, 2.0, 2.0], [0.0, -3.0, 4.0]], dtype=torch.float64), dim=1)
    tau, count = 0.5, 3
    bound = math.log(1 + count * math.exp(-2 / tau))
    # k = q and every negative opposite to the query: one row per query, each its own bank
    for row in range(2):
        negatives = -q[row].expand(count, 3)
        loss = info_nce(q[row : row + 1], q[row : row + 1], negatives, tau, mask=torch.tensor([True]))
        assert loss.item() == pytest.approx(bound, rel=1e-6)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        q, k, negatives = (F.normalize(torch.randn(n, 3, generator=generator), dim=1) for n in (4, 4, count))
        assert info_nce(q, k, negatives, tau).item() >= bound - 1e-6


def test_masked_byol_loss_matches_hand_computed_value_and_is_zero_at_a_perfect_match():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 5.0]], requires_grad=True)
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([True, True, False])
    assert byol_loss(p, z, mask=mask).item() == pytest.approx(1.0, rel=1e-6)  # (2 + 0) / 2; row 2 not counted
    assert byol_loss(z, 3 * z, mask=torch.ones(3, dtype=torch.bool)).item() == pytest.approx(0.0, abs=1e-6)


# --- global normalization: 1 and 2 processes give the same loss and DDP-averaged gradient ---

def _rows_and_mask() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6, 4, generator=generator)
    k = F.normalize(torch.randn(6, 8, generator=generator), dim=1)
    negatives = F.normalize(torch.randn(10, 8, generator=generator), dim=1)
    mask = torch.tensor([True, True, True, False, True, False])  # rank 0: 3 valid rows, rank 1: 1
    return inputs, k, negatives, mask


def _loss_and_grad(rows: slice) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 8)
    inputs, k, negatives, mask = _rows_and_mask()
    q = F.normalize(encoder(inputs[rows]), dim=1)
    loss = info_nce(q, k[rows], negatives, 0.2, mask=mask[rows]) + byol_loss(q, k[rows], mask=mask[rows])
    loss.backward()
    return loss.item(), encoder.weight.grad


def _two_process_loss(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss, grad = _loss_and_grad(slice(3 * rank, 3 * rank + 3))
        loss_tensor = torch.tensor(loss)
        for value in (loss_tensor, grad):  # what the engine logs and what DDP applies: means over ranks
            torch.distributed.all_reduce(value)
            value /= 2
        if rank == 0:
            torch.save({"loss": loss_tensor, "grad": grad}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_with_unequal_valid_rows_match_one_process_in_loss_and_ddp_averaged_gradient(tmp_path):
    loss, grad = _loss_and_grad(slice(0, 6))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_loss, args=(port, str(tmp_path / "two.pt")), nprocs=2)
    two = torch.load(tmp_path / "two.pt")
    assert two["loss"].item() == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(two["grad"], grad, rtol=1e-5, atol=1e-7)


# --- PLRC's point losses ---------------------------------------------------------------------

def test_point_contrast_matches_hand_computed_values_with_single_and_repeated_regions():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, 2 query points, D)
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # the image's 2 key points
    contrast = torch.cat([k[0], torch.tensor([[-1.0, 0.0]])])  # its keys, then another image's point
    # Regions (0, 1): row 0 logits [1, 0, -1] (positive 1), row 1 logits [0, 1, 0] (positive 1); C = 2.
    distinct = torch.tensor([[[True, False], [False, True]]])
    row0, row1 = math.log(math.e + 1 + math.exp(-1)), math.log(2 + math.e)
    expected = ((row0 - 1) + (row1 - 1)) / 2
    assert point_contrast(q, k, distinct, contrast, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # One region drawn twice: all 4 pairs positive, C = 4.
    repeated = torch.ones(1, 2, 2, dtype=torch.bool)
    expected = ((2 * row0 - 1 - 0) + (2 * row1 - 0 - 1)) / 4
    assert point_contrast(q, k, repeated, contrast, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # A masked column leaves the denominators: row 0 logits [1, 0], row 1 [0, 1].
    keep = torch.tensor([True, True, False])
    expected = (math.log(math.e + 1) - 1) * 2 / 2
    assert point_contrast(q, k, distinct, contrast, 1.0, contrast_mask=keep).item() == pytest.approx(expected, rel=1e-6)


def test_point_contrast_averages_per_image_over_valid_images_and_reaches_its_perfect_match_bound():
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, 5, generator=generator, dtype=torch.float64), dim=-1)
    k = F.normalize(torch.randn(3, 4, 5, generator=generator, dtype=torch.float64), dim=-1)
    labels = torch.tensor([[0, 0, 1, 2], [1, 1, 1, 1], [0, 1, 2, 3]])
    positive = labels[:, :, None] == labels[:, None, :]
    contrast = k.reshape(-1, 5)
    mask = torch.tensor([True, False, True])
    per_image = [point_contrast(q[b : b + 1], k[b : b + 1], positive[b : b + 1], contrast, 0.2).item() for b in (0, 2)]
    masked = point_contrast(q, k, positive, contrast, 0.2, mask=mask)
    assert masked.item() == pytest.approx(sum(per_image) / 2, rel=1e-6)
    # Perfect match: every positive key equals the query, the m other columns are its opposite.
    tau, n, m = 0.5, 3, 4
    anchor = F.normalize(torch.tensor([[[1.0, 2.0, 2.0]]], dtype=torch.float64), dim=-1)
    keys = anchor.expand(1, n, 3)
    contrast = torch.cat([keys[0], -anchor[0].expand(m, 3)])
    loss = point_contrast(anchor, keys, torch.ones(1, 1, n, dtype=torch.bool), contrast, tau)
    assert loss.item() == pytest.approx(math.log(n + m * math.exp(-2 / tau)), rel=1e-9)
    for _ in range(10):
        q, k = (F.normalize(torch.randn(1, 1, 3, generator=generator, dtype=torch.float64), dim=-1) for _ in range(2))
        others = F.normalize(torch.randn(m, 3, generator=generator, dtype=torch.float64), dim=-1)
        loss = point_contrast(q, k.expand(1, n, 3), torch.ones(1, 1, n, dtype=torch.bool), torch.cat([k[0].expand(n, 3), others]), tau)
        assert loss.item() >= math.log(n + m * math.exp(-2 / tau)) - 1e-9


def test_affinity_distillation_matches_hand_computed_value_and_averages_rows_then_images():
    contrast = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [1.0, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.0, 1.0], [-3.0, 2.0]], [[0.0, 1.0], [1.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    # Image 0, row 0: teacher softmax([0, 1]) = [a, 1 - a], a = 1 / (1 + e); student log_softmax([1, 0])
    # = [1 - log(1 + e), -log(1 + e)] -> CE = log(1 + e) - a. Row 1 is masked.
    a = 1 / (1 + math.e)
    image0 = math.log(1 + math.e) - a
    # Image 1: row 0 student = teacher -> entropy H([a, 1 - a]); row 1 likewise, mirrored: the same.
    entropy = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    expected = (image0 + entropy) / 2
    loss = affinity_distillation(student, teacher, contrast, 1.0, 1.0, mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad[0, 1].abs().sum() == 0  # a masked row gets no gradient
    # Teacher temperature sharpens the target: tau_t = 0.5 -> softmax([0, 2]).
    b = 1 / (1 + math.exp(2))
    sharp = affinity_distillation(student[:1, :1].detach(), teacher[:1, :1], contrast, 1.0, 0.5)
    assert sharp.item() == pytest.approx(-(b * (1 - math.log(1 + math.e)) + (1 - b) * -math.log(1 + math.e)), rel=1e-6)


def test_point_losses_with_everything_masked_are_zero_finite_and_keep_every_parameter_in_the_graph():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 6)
    q = F.normalize(encoder(torch.randn(2, 3, 4)), dim=-1)
    k = F.normalize(torch.randn(2, 3, 6), dim=-1)
    positive = torch.eye(3, dtype=torch.bool).expand(2, 3, 3)
    no_column = torch.zeros(6, dtype=torch.bool)  # not even the denominators have a valid column
    loss = point_contrast(q, k, positive, k.reshape(-1, 6), 0.2, contrast_mask=no_column, mask=torch.zeros(2, dtype=torch.bool))
    loss = loss + affinity_distillation(q, k, k.reshape(-1, 6), 0.1, 0.07, contrast_mask=no_column, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    for parameter in encoder.parameters():
        assert parameter.grad is not None and torch.equal(parameter.grad, torch.zeros_like(parameter))

