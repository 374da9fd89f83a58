"""A scripted policy and a synthetic training loop for mixer tests.

The scripted policy is never left in the registry (``policy_registered`` puts it there only while
a mixer is built): a leaked test policy would change what ``POLICIES`` lists elsewhere.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from odm_megatron.mixer import MixerConfig, OnlineMixer
from odm_megatron.policy import MixingPolicy, policy_registered
from odm_megatron.sampler import OnlineMixingBatchSampler


class ScriptedPolicy(MixingPolicy):
    """Update u sets the weights to script[u-1] (then keeps the last one)."""

    name = "test-scripted"

    def __init__(self, prior, script: Sequence[Sequence[float]] = ()) -> None:
        super().__init__(prior)
        self.script = [np.asarray(w, dtype=np.float64) for w in script]

    def _learn(self, mean_loss, observed, probs) -> None:
        pass

    def _propose(self):
        if not self.script:
            return None
        return self.script[min(self.num_updates, len(self.script)) - 1]


SEQ = 8


def synthetic_loss(keys: Sequence[tuple]) -> tuple:
    """Per-token losses, mask and ids for a micro-batch of (dataset_id, position) keys: a pure
    function of the key, so that any rank layout sees the same numbers for the same sample."""
    ids = torch.tensor([k[0] for k in keys], dtype=torch.int64)
    pos = torch.tensor([k[1] for k in keys], dtype=torch.int64)
    s = torch.arange(SEQ)
    loss = (2.0 + 0.7 * ids[:, None] + ((pos[:, None] * 31 + s[None, :] * 7) % 13) * 0.013).to(torch.float32)
    mask = (((pos[:, None] + s[None, :]) % 5) != 0).to(torch.float32)
    return loss, mask, ids


def train_synthetic(
    mixer: OnlineMixer,
    steps: range,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    stop_before: Optional[int] = None,
) -> dict:
    """Drive the mixer as a training loop would; returns the stream, weights and records."""
    gbs = mixer.config.global_batch_size
    sampler = OnlineMixingBatchSampler(mixer, total_samples=steps.stop * gbs, consumed_samples=steps.start * gbs,
                                       micro_batch_size=micro_batch_size, data_parallel_rank=rank,
                                       data_parallel_size=world_size)
    batches = iter(sampler)
    out = {"keys": [], "global": [], "weights": [], "records": []}
    for step in steps:
        if stop_before is not None and step == stop_before:
            break
        domains, positions = mixer.draw_global_batch(step)
        out["global"].append((domains.copy(), positions.copy()))
        out["weights"].append(mixer.weights_for_step(step))
        for _ in range(sampler.num_microbatches):
            keys = next(batches)
            out["keys"].append(keys)
            mixer.accumulate(*synthetic_loss(keys))
        record = mixer.step_end(step)
        if record is not None:
            out["records"].append((record.step, record.weights.copy(), record.mean_loss.copy(), record.token_counts.copy()))
    return out


def make_mixer(num_samples: Sequence[int], policy: str = "odm-exp3", gbs: int = 8, interval: int = 2, lag: int = 1,
               seed: int = 11, names: Optional[List[str]] = None, **policy_kwargs) -> OnlineMixer:
    k = len(num_samples)
    names = names or [f"d{i}" for i in range(k)]
    with policy_registered(ScriptedPolicy):
        config = MixerConfig(domain_names=names, seed=seed, global_batch_size=gbs, update_interval=interval,
                             lag=lag, policy=policy, policy_kwargs=policy_kwargs)
        return OnlineMixer(config, prior=np.full(k, 1.0 / k), num_samples_per_domain=np.asarray(num_samples))
