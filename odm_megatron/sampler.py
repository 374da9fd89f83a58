"""A batch sampler with Megatron's semantics over the online mixer.

Like megatron's ``MegatronPretrainingSampler``: it starts at ``consumed_samples`` and yields
this data-parallel rank's micro-batches, and the ranks' micro-batches partition each global
batch. Global batch ``step`` holds global samples ``[step * gbs, (step + 1) * gbs)``; its m-th
micro-batch round covers ``[m * mbs * dp, (m + 1) * mbs * dp)`` and rank r takes
``mbs`` consecutive samples at offset ``r * mbs`` in it. Items are the dataset keys
``(dataset_id, position)`` of :class:`~odm_megatron.dataset.OnlineBlendedDataset`.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

from odm_megatron.mixer import OnlineMixer


class OnlineMixingBatchSampler:
    def __init__(
        self,
        mixer: OnlineMixer,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        gbs = mixer.config.global_batch_size
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("micro_batch_size and data_parallel_size must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if gbs % (micro_batch_size * data_parallel_size) != 0:
            raise ValueError(
                f"global batch size {gbs} is not divisible by micro batch size {micro_batch_size} "
                f"x data-parallel size {data_parallel_size}"
            )
        if consumed_samples % gbs != 0:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not a multiple of the global batch size {gbs} "
                f"(batch-size ramp-up is not supported with online mixing)"
            )
        if total_samples < 1:
            raise ValueError(f"total_samples must be >= 1, got {total_samples}")
        self.mixer = mixer
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_batch_size = gbs
        self.num_microbatches = gbs // (micro_batch_size * data_parallel_size)

    def __len__(self) -> int:
        """Micro-batches this rank yields."""
        steps = (self.total_samples - self.consumed_samples) // self.global_batch_size
        return max(steps, 0) * self.num_microbatches

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        """Micro-batches from ``consumed_samples`` on. Each step is drawn from the mixer once, in
        order: a second iterator works only until the mixer completes a step; after that it asks
        for a step already trained and fails ("out of order"). To restart the loader mid-run, build
        a new sampler with ``consumed_samples = mixer.completed_steps * global_batch_size``."""
        gbs, mbs, dp = self.global_batch_size, self.micro_batch_size, self.data_parallel_size
        step = self.consumed_samples // gbs
        while (step + 1) * gbs <= self.total_samples:
            domains, positions = self.mixer.draw_global_batch(step)
            for m in range(self.num_microbatches):
                start = m * mbs * dp + self.data_parallel_rank * mbs
                yield list(zip(domains[start : start + mbs].tolist(), positions[start : start + mbs].tolist()))
            step += 1
