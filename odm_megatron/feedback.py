"""Per-domain loss accumulation on the device where the loss lives.

Each micro-batch adds, per domain, the sum of its masked per-token losses and its token count
into small device tensors with ``index_add_``: a handful of tiny kernels, no host
synchronisation. The host sees the numbers only every ``update_interval`` steps, after one
all-reduce (see :mod:`odm_megatron.distributed`).

Loss sums are kept in fixed point (int64, ``LOSS_SCALE`` units per nat). Integer addition is
associative, so the reduced totals are bit-identical whatever the number of data-parallel
ranks, the order of reduction, or whether a checkpoint split the window in two. That is what
makes the policy's weights exactly reproducible across layouts and resumes.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

LOSS_SCALE = 2**20
"""Fixed-point units per nat: resolution ~1e-6 per token."""

MAX_ABS_TOKEN_LOSS = 1.0e4
"""Per-token losses are clamped to +-this before conversion, so one int64 sum can hold
~9e11 tokens of loss 10 per domain and window without overflow."""

# Rows of the statistics tensor.
LOSS_SUM, TOKEN_COUNT, NONFINITE_COUNT = 0, 1, 2
NUM_STATS = 3


class DomainLossAccumulator:
    """Running per-domain [loss sum (fixed point), token count, non-finite count] on a device."""

    def __init__(self, num_domains: int, device: Optional[Union[str, torch.device]] = None) -> None:
        if num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {num_domains}")
        self.num_domains = num_domains
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.stats = torch.zeros(NUM_STATS, num_domains, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def add(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor, dataset_id: torch.Tensor) -> None:
        """Add one micro-batch: ``per_token_loss`` and ``loss_mask`` are [b, s], ``dataset_id`` [b]."""
        if per_token_loss.dim() != 2 or per_token_loss.shape != loss_mask.shape:
            raise ValueError(
                f"per_token_loss and loss_mask must both be [batch, seq]; got "
                f"{tuple(per_token_loss.shape)} and {tuple(loss_mask.shape)}"
            )
        if dataset_id.dim() != 1 or dataset_id.shape[0] != per_token_loss.shape[0]:
            raise ValueError(
                f"dataset_id must be [batch] = [{per_token_loss.shape[0]}], got {tuple(dataset_id.shape)}"
            )
        loss = per_token_loss.detach().to(device=self.device, dtype=torch.float32)
        counted = loss_mask.to(device=self.device) > 0
        finite = torch.isfinite(loss)
        kept = counted & finite
        clamped = torch.where(kept, loss, torch.zeros_like(loss)).clamp_(-MAX_ABS_TOKEN_LOSS, MAX_ABS_TOKEN_LOSS)
        fixed = torch.round(clamped.to(torch.float64) * LOSS_SCALE).to(torch.int64)
        ids = dataset_id.to(device=self.device, dtype=torch.int64)
        self.stats[LOSS_SUM].index_add_(0, ids, fixed.sum(dim=1))
        self.stats[TOKEN_COUNT].index_add_(0, ids, kept.sum(dim=1))
        self.stats[NONFINITE_COUNT].index_add_(0, ids, (counted & ~finite).sum(dim=1))

    def reset(self) -> None:
        self.stats.zero_()


def mean_losses(stats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean loss per domain as float64 with nan where unobserved or non-finite, token counts)."""
    stats = np.asarray(stats, dtype=np.int64).reshape(NUM_STATS, -1)
    tokens = stats[TOKEN_COUNT]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = stats[LOSS_SUM].astype(np.float64) / LOSS_SCALE / tokens
    mean[tokens == 0] = np.nan
    mean[stats[NONFINITE_COUNT] > 0] = np.nan
    return mean, tokens


def observed_tokens(stats: np.ndarray) -> np.ndarray:
    """Tokens each domain was measured on, non-finite ones included: what the policy needs to tell
    a domain whose losses were all non-finite (observed, nan: skipped with a warning) from one
    that was not sampled at all."""
    stats = np.asarray(stats, dtype=np.int64).reshape(NUM_STATS, -1)
    return stats[TOKEN_COUNT] + stats[NONFINITE_COUNT]
