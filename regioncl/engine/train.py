"""The pretraining loop: any registered method, one or many processes, exact resume.

    pretrain(settings, shards, out, workdir)

Per step: lr from the schedule, loss = method(batch) averaged over ``accumulate_steps``
micro-batches (under autocast when ``amp`` is set), SGD/LARS step (through a GradScaler for
fp16), EMA update of the method's momentum pairs. Every ``checkpoint_every_steps`` (and at the end) rank 0 saves the full state
to ``workdir``; a re-run resumes from the newest valid one and ends with the same weights as an
uninterrupted run. At the end rank 0 writes the pretrained checkpoint ``out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from regioncl.augment import finish_views
from regioncl.curves import MetricsLog
from regioncl.data.shards import ShardStream
from regioncl.engine import dist
from regioncl.engine.checkpoint import (
    capture_rng_state,
    load_latest_checkpoint,
    lock_workdir,
    restore_rng_state,
    save_resume_checkpoint,
)
from regioncl.engine.loader import ViewStream, epoch_batches, make_loader
from regioncl.engine.optim import build_optimizer, scaled_lr, set_lr
from regioncl.engine.schedule import LrSchedule
from regioncl.engine.settings import PretrainSettings
from regioncl.methods.base import PretrainMethod, StepInfo, get_method
from regioncl.models import gather
from regioncl.models.sync_bn import convert_sync_batchnorm
from regioncl.progress import Progress
from regioncl.weights import check_same_run, write_pretrained_checkpoint

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Settings that may change between a run and its resume without changing the result.
RESUME_MAY_CHANGE = frozenset({"checkpoint_every_steps", "keep_checkpoints", "log_every", "device"})
# Settings added after runs were started: hashed only when set away from their defaults, so
# runs started before they existed (the same training) keep their identity and still resume.
ADDED_SINCE_FIRST_RUNS = frozenset({"warmup_start_factor", "final_lr", "lr_update"})


def run_identity(settings: PretrainSettings, shards: Sequence[str | Path]) -> str:
    """A short hash of what a resumable checkpoint must share with the run resuming it.

    The workflow keeps checkpoints under ``workdir/<identity>``: a re-run with the same
    settings and shards resumes, while changed settings or rebuilt shards of another size
    start a fresh run beside the old checkpoints instead of resuming from stale state.
    (Shards are byte-reproducible, so a rebuilt identical shard still resumes.)
    """
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainSettings)}
    config = {
        key: value
        for key, value in settings.to_dict().items()
        if key not in RESUME_MAY_CHANGE and not (key in ADDED_SINCE_FIRST_RUNS and value == defaults[key])
    }
    data = sorted((Path(shard).name, Path(shard).stat().st_size) for shard in shards)
    blob = json.dumps([config, data], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def pretrain(
    settings: PretrainSettings,
    shards: Sequence[str | Path],
    out: str | Path,
    workdir: str | Path,
    *,
    metrics: str | Path | None = None,
    stop_after_steps: int | None = None,
) -> None:
    """Train ``settings.method`` on ``shards``; write ``out`` once all epochs are done.

    Distributed setup comes from the environment (torchrun or SLURM, else one process).
    Per-step loss and lr go to ``workdir/metrics.jsonl`` (``regioncl.curves``), copied to
    ``metrics`` with ``out``. ``stop_after_steps``: checkpoint and return once that many steps
    are done, without writing ``out`` (for wall-clock-limited jobs, and to test resume).
    """
    env = dist.read_dist_env()
    device = dist.init_distributed(env, settings.device)
    try:
        # Rank 0 alone writes the workdir, so it alone holds the lock against a second run.
        with lock_workdir(Path(workdir)) if gather.rank() == 0 else nullcontext():
            metrics_out = Path(metrics) if metrics is not None else None
            _train(settings, [Path(s) for s in shards], Path(out), Path(workdir), device, stop_after_steps, metrics_out)
    finally:
        dist.shutdown()


def _train(
    settings: PretrainSettings,
    shards: list[Path],
    out: Path,
    workdir: Path,
    device: torch.device,
    stop: int | None,
    metrics_out: Path | None,
) -> None:
    rank, world = gather.rank(), gather.world_size()
    is_main = rank == 0
    accumulate = settings.accumulate_steps
    if settings.batch_size % (world * accumulate):
        raise ValueError(
            f"batch_size: {settings.batch_size} is not divisible by world size {world} x accumulate_steps {accumulate}"
        )
    micro_batch = settings.batch_size // (world * accumulate)  # per rank, per forward pass
    per_rank_batch = micro_batch * accumulate  # per rank, per optimizer step

    torch.manual_seed(settings.seed)  # identical initial weights and queues on every rank
    method = get_method(settings.method)(settings.method_params, arch=settings.arch)
    if settings.sync_bn:
        convert_sync_batchnorm(method, device)  # before the optimizer: on the CPU it makes new BN parameters
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    method.to(device).train()
    if settings.channels_last:
        method.to(memory_format=memory_format)
    optimizer = build_optimizer(method, settings.optimizer, settings.batch_size)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == "fp16")
    autocast_dtype = AUTOCAST_DTYPES.get(settings.amp)

    samples = ShardStream(shards, seed=settings.seed, rank=rank, world_size=world)
    steps_per_epoch = samples.num_samples // settings.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size: {settings.batch_size} exceeds the {samples.num_samples} samples in the shards")
    total_steps = steps_per_epoch * settings.epochs
    lr_at = LrSchedule(
        base_lr=scaled_lr(settings.optimizer, settings.batch_size),
        warmup_steps=round(settings.warmup_epochs * steps_per_epoch),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        warmup_start_factor=settings.warmup_start_factor,
        final_lr=settings.final_lr,
        per_epoch=settings.lr_update == "epoch",
    )

    workdir.mkdir(parents=True, exist_ok=True)
    step = _resume(method, optimizer, scaler, settings, workdir, steps_per_epoch, report=print if is_main else _silent)
    log = MetricsLog(workdir / "metrics.jsonl", step) if is_main else None
    chance = method.chance_loss()

    model: nn.Module = method
    if world > 1:
        # Queues stay equal on all ranks by enqueueing all-gathered keys: no per-step buffer broadcast.
        model = DistributedDataParallel(
            method, forward_sync_buffers=False, find_unused_parameters=method.find_unused_parameters
        )
    views = ViewStream(samples, method.make_views, settings.seed, output=settings.photometric)
    loader = make_loader(views, settings.num_workers, settings.seed, step_items=per_rank_batch)
    last_step = total_steps if stop is None else min(stop, total_steps)
    progress = Progress(total_steps, initial=step, desc=f"pretrain {settings.method}", every=settings.log_every)
    tick = time.perf_counter()
    pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []  # steps not yet logged
    while step < last_step:
        epoch, first_batch = divmod(step, steps_per_epoch)
        views.start_epoch(epoch, skip_samples=first_batch * per_rank_batch)
        batches = epoch_batches(
            loader,
            method.collate,
            batch_size=micro_batch,
            first_batch=first_batch * accumulate,
            num_batches=steps_per_epoch * accumulate,
        )
        for micro_batches in _groups(batches, accumulate):
            info = StepInfo(step, epoch, steps_per_epoch, total_steps, settings.seed)
            lr = lr_at(step)
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            losses: dict[str, torch.Tensor] = {}
            for index, batch in enumerate(micro_batches):
                # DDP all-reduces gradients once per optimizer step, on the last micro-batch.
                last = index == accumulate - 1
                with nullcontext() if last or model is method else model.no_sync():
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        micro_losses = model(_to_device(batch, device, memory_format), info)
                    scaler.scale(micro_losses["loss"] / accumulate).backward()
                for name, value in micro_losses.items():
                    losses[name] = losses.get(name, 0.0) + value.detach().float() / accumulate
            scaler.step(optimizer)
            scaler.update()
            method.update_momentum(info)
            step += 1

            # The step's losses stay on the device until the next flush: reading them every step
            # (.item()) would make the host wait for the device at every step.
            pending.append(({"step": step, "epoch": epoch, "lr": lr, "momentum": method.momentum_at(info)}, losses))
            checkpoint_due = step % settings.checkpoint_every_steps == 0 or step == last_step
            if checkpoint_due or step % settings.log_every == 0:
                # Before a checkpoint, so a non-finite loss stops the run before its state is saved.
                tick = _flush_metrics(pending, log, progress, chance, settings.batch_size, tick)
            if is_main and checkpoint_due:
                state = _training_state(method, optimizer, scaler, settings, step, steps_per_epoch)
                save_resume_checkpoint(workdir, step, state, settings.keep_checkpoints)
            if step == last_step:
                break
    progress.close()
    if is_main and step == total_steps:
        if metrics_out is not None:
            log.publish(metrics_out)
        backbone, transfer = method.transfer_state()
        write_pretrained_checkpoint(
            out,
            method=settings.method,
            arch=settings.arch,
            steps=total_steps,
            epochs=settings.epochs,
            backbone=backbone,
            transfer=transfer,
            config=settings.to_dict(),
        )


def _flush_metrics(
    pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]],
    log: MetricsLog | None,
    progress: Progress,
    chance: float | None,
    batch_size: int,
    since: float,
) -> float:
    """Log the ``pending`` steps (their record, their losses still on the device) with one
    all-reduce and one host copy for all of them, stop at the first non-finite loss, and empty
    ``pending``. Every rank calls it at the same steps (it all-reduces). Returns the time now,
    the start of the next window: ``images_per_s`` is the window's mean."""
    flat = [(index, name) for index, (_, losses) in enumerate(pending) for name in losses]
    values = gather.all_reduce_mean(torch.stack([pending[i][1][name].reshape(()) for i, name in flat])).tolist()
    now = time.perf_counter()
    images_per_s = batch_size * len(pending) / (now - since)
    logged: list[dict[str, float]] = [{} for _ in pending]
    for (index, name), value in zip(flat, values, strict=True):
        logged[index][name] = value
    for (record, _), losses in zip(pending, logged, strict=True):
        _check_finite_losses(losses, record["step"])
        if log is not None:
            full = {**record, "images_per_s": images_per_s, **losses}
            log.append(full if chance is None else {**full, "chance_loss": chance})
    if log is not None:
        last, losses = pending[-1][0], logged[-1]
        progress.update(last["step"], loss=losses["loss"], lr=last["lr"], img_s=images_per_s)
    pending.clear()
    return now


def _check_finite_losses(losses: dict[str, float], step: int) -> None:
    """Stop a diverged run at the step it diverged, before its state reaches a checkpoint."""
    bad = sorted(name for name, value in losses.items() if not math.isfinite(value))
    if bad:
        raise FloatingPointError(f"pretrain step {step}: non-finite loss {bad} ({losses}); stopped, nothing written")


def _silent(message: str) -> None:
    del message  # non-zero ranks do not print what rank 0 already reports


def _groups(batches: Iterable[Any], size: int) -> Iterator[tuple[Any, ...]]:
    """Consecutive tuples of ``size`` batches (the micro-batches of one optimizer step)."""
    iterator = iter(batches)
    return zip(*[iterator] * size)


def _training_state(
    method: PretrainMethod,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: PretrainSettings,
    step: int,
    steps_per_epoch: int,
) -> dict[str, Any]:
    # The LR schedule is a pure function of the step, so the step is its position.
    return {
        "step": step,
        "data_position": divmod(step, steps_per_epoch),  # (epoch, batch index within the epoch) of the next batch
        "steps_per_epoch": steps_per_epoch,
        "model": method.state_dict(),  # online and momentum encoders, and queues (buffers)
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),  # fp16 loss scale and its growth tracker ({} without fp16)
        "rng": capture_rng_state(),
        "config": settings.to_dict(),
    }


def _resume(
    method: PretrainMethod,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    settings: PretrainSettings,
    workdir: Path,
    steps_per_epoch: int,
    report: Callable[[str], None],
) -> int:
    """Load the newest valid checkpoint in ``workdir`` into the method, optimizer and scaler; return its step (0 if none)."""
    found = load_latest_checkpoint(workdir, report)
    if found is None:
        return 0
    state, path = found
    check_same_run(path, state["config"], settings.to_dict(), RESUME_MAY_CHANGE)
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(
            f"resume: {path} has {state['steps_per_epoch']} steps per epoch, the shards now give {steps_per_epoch}"
        )
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_state(state["rng"])
    report(f"resuming from step {state['step']} (checkpoint {path})")
    return state["step"]


def _to_device(batch: Any, device: torch.device, memory_format: torch.memory_format) -> Any:
    """``batch`` on ``device``, its uint8 views finished there (``augment.finish_views``: device-mode
    photometric, float, normalised); (B, C, H, W) float images in ``memory_format``.

    On CUDA the host tensors are pinned first, so every copy is asynchronous: no host sync.
    """
    moved = _move(batch, device)
    if isinstance(batch, dict):
        moved = finish_views(moved, host=batch)
    return _in_memory_format(moved, memory_format)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _move(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(value, device) for value in batch)
    return batch


def _in_memory_format(batch: Any, memory_format: torch.memory_format) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.contiguous(memory_format=memory_format) if batch.dim() == 4 and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: _in_memory_format(value, memory_format) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_in_memory_format(value, memory_format) for value in batch)
    return batch
