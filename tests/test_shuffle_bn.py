"""Shuffle-BN (regioncl.models.shuffle_bn) on two real gloo ranks, with a probe encoder.

The probe is what a key encoder is to shuffle-BN: a per-image function (which row came from
which image) plus a BN-like term that depends on the whole batch it was encoded in (which
images shared BN statistics). It also reports the rank that ran it.
"""

import os
import socket
from pathlib import Path

import pytest
import torch

from regioncl.engine.dist import init_distributed, read_dist_env, shutdown
from regioncl.models import gather
from regioncl.models.shuffle_bn import rank_agreed_permutation, shuffle_bn_encode

WORLD, BATCH, SEED = 2, 3, 7  # 3 images per rank: any batch size, not only powers of two
STEPS = (0, 1, 2)


def _rank_inputs(rank: int) -> dict:
    """This rank's images: ids (B,) and DetCo-like patches (B, 9, 2) whose values name their image."""
    ids = torch.arange(rank * BATCH, (rank + 1) * BATCH, dtype=torch.float32)
    patches = ids.view(-1, 1, 1) * 100 + torch.arange(9.0).view(1, 9, 1) * torch.ones(1, 1, 2)
    return {"id": ids, "patches": patches}


def _probe_encoder(inputs: dict) -> dict:
    ids = inputs["id"]  # (b,)
    return {
        "levels": (ids * 2, inputs["patches"] + 0.5),  # per image, a structure like multi-level features
        "normalized": ids - ids.mean(),  # BN-like: moves with the batch the image was encoded in
        "batch": ids.expand(len(ids), -1).clone(),  # (b, b): the images encoded together with this one
        "encoded_by": torch.full_like(ids, float(gather.rank())),
    }


def _rank(rank: int, port: int, result_dir: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(read_dist_env(), "cpu")
    try:
        inputs = _rank_inputs(rank)
        results = {step: shuffle_bn_encode(_probe_encoder, inputs, seed=SEED, step=step) for step in STEPS}
        results["unshuffled"] = shuffle_bn_encode(_probe_encoder, inputs, seed=SEED, step=0, enabled=False)
        torch.save(results, result_dir / f"rank{rank}.pt")
    finally:
        shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Each rank's {step: (mine, everyone)} and its "unshuffled" (enabled=False) result."""
    result_dir = tmp_path_factory.mktemp("shuffle_bn")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, result_dir), nprocs=WORLD)
    return [torch.load(result_dir / f"rank{rank}.pt") for rank in range(WORLD)]


def _own_batch(rank: int) -> torch.Tensor:
    return _rank_inputs(rank)["id"]


def test_outputs_come_back_in_image_order_on_every_rank(two_ranks):
    all_ids = torch.arange(WORLD * BATCH, dtype=torch.float32)
    all_patches = torch.cat([_rank_inputs(rank)["patches"] for rank in range(WORLD)])
    for rank, results in enumerate(two_ranks):
        for step in STEPS:
            mine, everyone = results[step]
            # Row j of every output belongs to image j (rank j // B, position j % B).
            assert torch.equal(everyone["levels"][0], all_ids * 2)
            assert torch.equal(everyone["levels"][1], all_patches + 0.5)
            assert torch.equal(mine["levels"][0], _own_batch(rank) * 2)
            for name in ("normalized", "batch", "encoded_by"):
                assert torch.equal(mine[name], everyone[name][rank * BATCH : (rank + 1) * BATCH])
            # The BN-like term is the one of the batch the image was reported in.
            torch.testing.assert_close(everyone["normalized"], all_ids - everyone["batch"].mean(dim=1))


def test_ranks_agree_on_the_permutation_and_it_changes_every_step(two_ranks):
    for step in STEPS:
        first, second = two_ranks[0][step][1], two_ranks[1][step][1]
        assert all(torch.equal(first[name], second[name]) for name in ("batch", "encoded_by"))
    batches = [two_ranks[0][step][1]["batch"] for step in STEPS]
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])
    assert torch.equal(rank_agreed_permutation(6, SEED, 1), rank_agreed_permutation(6, SEED, 1))


def test_no_rank_encodes_its_own_batch_so_bn_statistics_cannot_mark_the_positive(two_ranks):
    for step in STEPS:
        everyone = two_ranks[0][step][1]
        # Images of the same rank are spread over both ranks' encoder batches (true of these
        # seeded draws; a random permutation of 6 keeps a rank's 3 images together 1 time in 10)...
        for rank in range(WORLD):
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            assert len(set(everyone["encoded_by"][rows].tolist())) == WORLD, (step, rank)
            own_batch = set(_own_batch(rank).tolist())
            assert all(set(batch.tolist()) != own_batch for batch in everyone["batch"][rows]), (step, rank)
        # ... and the BN-like term differs from the one a rank-local encoding would give.
        local = torch.cat([_own_batch(rank) - _own_batch(rank).mean() for rank in range(WORLD)])
        assert not torch.allclose(everyone["normalized"], local)


def test_disabled_shuffle_encodes_each_rank_locally_and_gathers_in_rank_order(two_ranks):
    for rank, results in enumerate(two_ranks):
        mine, everyone = results["unshuffled"]
        assert torch.equal(everyone["encoded_by"], torch.arange(WORLD).repeat_interleave(BATCH).float())
        assert torch.equal(everyone["levels"][0], torch.arange(WORLD * BATCH, dtype=torch.float32) * 2)
        assert torch.equal(mine["batch"], _own_batch(rank).expand(BATCH, -1))


def test_one_process_only_runs_the_encoder_on_the_given_inputs():
    inputs = _rank_inputs(0)
    calls = []

    def encoder(batch: dict) -> dict:
        calls.append(batch)
        return _probe_encoder(batch)

    mine, everyone = shuffle_bn_encode(encoder, inputs, seed=SEED, step=0)
    assert len(calls) == 1 and calls[0] is inputs  # no gather, no permutation
    assert torch.equal(mine["batch"], _own_batch(0).expand(BATCH, -1))
    assert all(torch.equal(a, b) for a, b in zip(mine["levels"], everyone["levels"]))


def test_keys_carry_no_gradient_even_from_a_trainable_encoder():
    linear = torch.nn.Linear(2, 2)
    mine, _ = shuffle_bn_encode(linear, torch.ones(3, 2), seed=SEED, step=0)
    assert not mine.requires_grad


def test_inputs_or_outputs_without_one_shared_batch_dimension_are_refused():
    mixed = {"a": torch.zeros(3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"inputs: expected tensors with one shared first dimension, got first dimensions \[3, 4\]"):
        shuffle_bn_encode(lambda x: x, mixed, seed=SEED, step=0)
    with pytest.raises(ValueError, match=r"encoder output: expected tensors with first dimension 3 \(one row per image\)"):
        shuffle_bn_encode(lambda x: x.flatten(), torch.zeros(3, 2), seed=SEED, step=0)
