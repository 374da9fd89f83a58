"""The one place where megatron-core is taught to run without a GPU.

megatron-core 0.16 assumes CUDA in a handful of spots that a GPT forward/backward on CPU hits:

* ``torch.cuda.current_device()`` is used as a *device argument* all over (global memory buffer
  of the attention, TP layers, rotary embeddings, ...). On a CPU-only build it raises; returning
  ``"cpu"`` makes every such ``torch.empty(..., device=torch.cuda.current_device())`` land on CPU.
* The tensor-parallel RNG tracker (``tensor_parallel.random``) stores and swaps *CUDA* generator
  states around dropout and weight init (``get_cuda_rng_tracker().fork()``). We install a tracker
  with the same interface that swaps named states of the CPU default generator instead, and a
  seeding function that mirrors ``model_parallel_cuda_manual_seed``'s seed layout.
* The default causal mask of the unfused softmax is built with ``device="cuda"``
  (``transformer.utils.get_default_causal_mask``, imported by name into ``fusions.fused_softmax``).

:func:`apply_cpu_shims` patches exactly these, and only when ``torch.cuda.is_available()`` is
False; on a GPU it is a no-op, so GPU runs use stock megatron-core. It is idempotent.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Dict, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

_APPLIED = False


class CpuRNGStatesTracker:
    """Drop-in for megatron-core's ``CudaRNGStatesTracker`` that keeps CPU generator states.

    ``fork(name)`` swaps the named state into the CPU default generator, runs the block, stores
    the advanced state back under ``name`` and restores the outer state, which is what the CUDA
    tracker does with the CUDA generator. States are ``torch.ByteTensor`` s, so
    ``get_states``/``set_states`` round-trip through checkpoints.
    """

    def __init__(self, *args, **kwargs) -> None:  # accepts the CUDA tracker's keyword arguments
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def get_states(self) -> Dict[str, torch.Tensor]:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(int(seed)).get_state()

    @contextlib.contextmanager
    def fork(self, name: Optional[str] = None) -> Iterator[None]:
        from megatron.core.tensor_parallel import random as tp_random

        name = name or tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def model_parallel_cpu_manual_seed(seed: int) -> None:
    """CPU counterpart of megatron-core's ``model_parallel_cuda_manual_seed``.

    Same seed layout (data-parallel state = ``seed``, tensor-parallel state = ``seed + 2718 +
    tp_rank``, expert state = ``seed + 1024 + 100 * ep_rank + etp_rank``), with the CPU default
    generator seeded to ``seed`` in place of the CUDA one.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random

    tracker = tp_random.get_cuda_rng_tracker()
    tracker.reset()
    torch.manual_seed(seed)
    tracker.add(tp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(tp_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + parallel_state.get_tensor_model_parallel_rank())
    tracker.add(tp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * parallel_state.get_expert_model_parallel_rank()
                + parallel_state.get_expert_tensor_parallel_rank())


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def apply_cpu_shims() -> bool:
    """Patch megatron-core for CPU execution if (and only if) no GPU is available.

    Returns True when the shims are active. Call before building the model.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer import utils as transformer_utils

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    tp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Anything that calls megatron's seeding entry point gets the CPU version.
    tp_random.model_parallel_cuda_manual_seed = (  # type: ignore[assignment]
        lambda seed, *args, **kwargs: model_parallel_cpu_manual_seed(seed))

    transformer_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    _APPLIED = True
    logger.debug("megatron-core CPU shims applied")
    return True


def rng_tracker_states() -> Dict[str, torch.Tensor]:
    """The named states of megatron-core's RNG tracker (CPU or CUDA), for checkpoints."""
    from megatron.core.tensor_parallel import random as tp_random

    return dict(tp_random.get_cuda_rng_tracker().get_states())


def set_rng_tracker_states(states: Dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random.get_cuda_rng_tracker().set_states(dict(states))
