"""Self-supervised losses, each with its paper formula; tests check them against hand-computed values.

Masking rule for every method: a loss over rows that may be invalid (padded boxes, windows that
left the other view, crops that do not intersect) is ``masked_mean(per_row, mask)``, the mean
over the valid rows of the *global* batch. It stays in the autograd graph whatever the mask
(no branch on ``mask.any()``): an all-empty mask gives a loss of 0 with zero gradients and
every parameter still used, as DDP requires. Masked rows must hold finite values (padding is
zeros): their loss is discarded by ``torch.where``, but a NaN there would still reach the
gradients through 0 * NaN.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from regioncl.models import gather


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This rank's share of the mean of ``values`` over the valid rows of all ranks.

    values: (...) per-row losses; mask: (...) bool, True = valid. With W ranks,

        n   = sum over ranks of mask.sum()                     (all-reduced, no gradient)
        L_r = W * sum_{valid i of rank r} values_i / max(n, 1)

    DDP averages gradients over ranks, so a step follows (1/W) sum_r grad L_r = grad of the global
    mean sum_{all valid i} values_i / max(n, 1); the mean of L_r over ranks (what the engine logs)
    is that global mean too. One process: sum(values * mask) / max(n, 1). A rank with no valid row
    still joins the all-reduce and contributes 0, so 1 and N processes agree.
    """
    count = mask.sum(dtype=torch.float32).detach()
    total_count = gather.all_reduce_sum_with_grad(count)  # identity with one process
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() * gather.world_size() / total_count.clamp(min=1)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE (MoCo eq. 1) of each query row against its positive key and a shared bank of negatives.

        L_i = -log( exp(q_i . k_i / tau) / (exp(q_i . k_i / tau) + sum_j exp(q_i . n_j / tau)) )

    q: (..., D) queries, k: (..., D) their positive keys (same leading shape: (N, D) images, or
    (B, K, D) regions), negatives: (M, D) rows n_j shared by every query, of any size (MoCo's
    queue, ReSim's densely pooled key maps of the batch, a per-level patch bank); all
    L2-normalized by the caller; ``k`` and ``negatives`` should carry no gradient.

    ``mask`` None: the mean over this rank's rows (every row valid, equal batches per rank).
    ``mask`` (...) bool: ``masked_mean`` over the valid rows of all ranks. The lower bound, reached
    when every k_i = q_i and every n_j = -q_i, is log(1 + M exp(-2 / tau)).
    """
    q, k = q.reshape(-1, q.shape[-1]), k.reshape(-1, k.shape[-1])  # (N, D)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negative = q @ negatives.T  # (N, M)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1 + M)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive is column 0
    if mask is None:
        return F.cross_entropy(logits, labels)
    return masked_mean(F.cross_entropy(logits, labels, reduction="none"), mask.reshape(-1))


def byol_loss(p: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BYOL's normalized MSE (eq. 2): 2 - 2 * <p/||p||, z/||z||> per row; 0 at a perfect match (the minimum).

    p: (..., D) online predictions; z: (..., D) target projections (no gradient: detached here).
    ``mask`` None: the mean over this rank's rows. ``mask`` (...) bool: ``masked_mean`` over the
    valid rows of all ranks (SoCo: boxes present in both views).
    """
    per_row = 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)  # (...)
    if mask is None:
        return per_row.mean()
    return masked_mean(per_row, mask)


# A masked contrast column's logit: exp(_MASKED_LOGIT - max) is exactly 0 in float32, and a row
# whose columns are all masked stays finite (such a row is masked itself).
_MASKED_LOGIT = -1e9


def _per_row(function, chunk_size: int | None, *rows: torch.Tensor) -> torch.Tensor:
    """``function(*rows)`` -> (N,) per-row values, computed ``chunk_size`` rows at a time (None: at once).

    Each chunk runs under activation checkpointing, so only one chunk's (chunk, M) similarity
    matrices are alive in the forward and the backward (which recomputes them): peak memory
    ~chunk / N of the unchunked one, for one extra forward of the chunk's matrices.
    """
    total = rows[0].shape[0]
    if chunk_size is None or chunk_size >= total:
        return function(*rows)
    parts = []
    for start in range(0, total, chunk_size):
        piece = [row[start : start + chunk_size] for row in rows]
        parts.append(checkpoint(function, *piece, use_reentrant=False) if torch.is_grad_enabled() else function(*piece))
    return torch.cat(parts)


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 when it is in a lower precision (bf16 / fp16 under autocast), else as it is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _masked_logits(rows: torch.Tensor, contrast: torch.Tensor, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n, D) x (M, D) -> (n, M) logits rows . contrast_j / tau, ``_MASKED_LOGIT`` where ``keep`` (M,) is False."""
    return (rows @ contrast.T / temperature).masked_fill(~keep, _MASKED_LOGIT)


def point_contrast(
    q: torch.Tensor,
    k: torch.Tensor,
    positive: torch.Tensor,
    contrast: torch.Tensor,
    temperature: float,
    *,
    contrast_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Point-level region contrast (PLRC eq. 2): per image, the mean over its positive point pairs
    of a multi-positive InfoNCE, then the mean over images.

        L_b = -(1/C_b) sum_{(i,k): a_i = a_k} log( exp(p_i . p'_k / tau) / sum_j exp(p_i . p'_j / tau) )
        C_b = the number of positive pairs (i, k) of image b

    q: (B, Nq, D) query points p_i of each image (online encoder); k: (B, Nk, D) the key points
    p'_k of the same image (momentum encoder; no gradient); positive: (B, Nq, Nk) bool, a_i = a_k
    (same region); contrast: (M, D) every key point p'_j the denominator runs over, the image's own
    (intra-image; ``k``'s rows are among them) and other images' (inter-image), no gradient;
    ``contrast_mask`` (M,) bool, the columns that count (None: all). All L2-normalized.
    ``mask`` (B,) bool: ``masked_mean`` over the valid images of all ranks (None: every image).

    With lse_i = log sum_j exp(p_i . p'_j / tau) and n_i the positives of row i,
    C_b L_b = sum_i n_i lse_i - sum_i p_i . (sum_{k: pos} p'_k) / tau: the (Nq, M) logits are
    needed for lse_i only, ``chunk_size`` rows at a time (None: all rows at once). Computed in
    float32 (or wider) whatever the autocast. At a perfect match (every positive p'_k = p_i, every other
    column -p_i) a row with n positives and m other columns reaches log(n + m exp(-2 / tau)).
    """
    with torch.autocast(q.device.type, enabled=False):
        batch, rows, dim = q.shape
        q, k, contrast = _full_precision(q), _full_precision(k), _full_precision(contrast)
        keep = torch.ones(contrast.shape[0], dtype=torch.bool, device=q.device) if contrast_mask is None else contrast_mask
        flat = q.reshape(-1, dim)
        lse = _per_row(lambda r: torch.logsumexp(_masked_logits(r, contrast, keep, temperature), dim=1), chunk_size, flat)
        positive = positive.to(q.dtype)  # (B, Nq, Nk)
        counts = positive.sum(dim=2)  # (B, Nq) n_i
        positive_sum = positive @ k  # (B, Nq, D) sum of each row's positive keys
        pair_sum = (counts * lse.view(batch, rows)).sum(dim=1) - (q * positive_sum).sum(dim=(1, 2)) / temperature
        per_image = pair_sum / counts.sum(dim=1).clamp(min=1)  # (B,)
        if mask is None:
            return per_image.mean()
        return masked_mean(per_image, mask)


def affinity_distillation(
    student: torch.Tensor,
    teacher: torch.Tensor,
    contrast: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
    *,
    contrast_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Point affinity distillation (PLRC eq. 3-4, primes restored as the spec reads them): per
    image, the mean over its valid points of the cross-entropy from the teacher's to the
    student's affinity over the key points, then the mean over images with a valid point.

        A_{ik'}(tau) = exp(p_i . p'_k / tau) / sum_j exp(p_i . p'_j / tau)                   (eq. 3)
        L_b = -(1/n_b) sum_{valid i} sum_k A_{i'k'}(tau_t) log A_{ik'}(tau_s)                  (eq. 4)

    student: (B, N, D) p_i (online encoder); teacher: (B, N, D) p'_i, the momentum encoder's
    feature of the same point i (no gradient: detached here); contrast: (M, D) the key points
    p'_k (and p'_j), ``contrast_mask`` (M,) bool the columns that count (None: all); all
    L2-normalized. ``mask`` (B, N) bool: the rows that count (None: all); n_b the valid rows of
    image b; images without any are left out of the mean (``masked_mean`` over the images of all
    ranks). In float32 (or wider) whatever the autocast, ``chunk_size`` rows at a time (None: at once). At a
    fixed teacher the minimum is the teacher's entropy, reached when student = teacher affinities.
    """
    with torch.autocast(student.device.type, enabled=False):
        batch, rows, dim = student.shape
        student, teacher, contrast = _full_precision(student), _full_precision(teacher.detach()), _full_precision(contrast)
        keep = torch.ones(contrast.shape[0], dtype=torch.bool, device=student.device) if contrast_mask is None else contrast_mask

        def cross_entropy(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            target = torch.softmax(_masked_logits(t, contrast, keep, teacher_temperature), dim=1)  # masked columns: exactly 0
            log_student = torch.log_softmax(_masked_logits(s, contrast, keep, student_temperature), dim=1)
            return -(target * log_student).sum(dim=1)

        per_row = _per_row(cross_entropy, chunk_size, student.reshape(-1, dim), teacher.reshape(-1, dim)).view(batch, rows)
        rows_mask = torch.ones(batch, rows, dtype=torch.bool, device=student.device) if mask is None else mask
        kept = torch.where(rows_mask, per_row, torch.zeros((), device=student.device))
        counts = rows_mask.sum(dim=1)  # (B,) n_b
        per_image = kept.sum(dim=1) / counts.clamp(min=1)
        return masked_mean(per_image, counts > 0)
