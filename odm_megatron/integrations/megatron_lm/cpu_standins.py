"""CPU stand-ins: what Megatron-LM's own training loop needs to run on a machine without a GPU.

Megatron-LM assumes CUDA throughout ``megatron.training``. To prove the integration in its real
``pretrain()`` -> ``train()`` -> ``save_checkpoint``/``load_checkpoint`` loop on CPU-only CI
machines (gloo processes, torch's CPU build), :func:`apply` puts in the stand-ins below, each
answering one concrete failure. They are applied by :func:`~.hooks.install` only when
``torch.cuda.is_available()`` is False, never on a GPU: a GPU run uses Megatron-LM unchanged.

===============================================  ====================================================
replaced                                         why
===============================================  ====================================================
``...custom_layers.batch_invariant_kernels``     imports triton at module level (``initialize.py``
                                                 imports it); triton has no CPU build
``initialize_megatron(allow_no_cuda=False)``     asserts "Megatron requires CUDA."
``torch.cuda.device_count`` -> 1,                ``> 0`` decides whether Megatron sets up the model-
``set_device``/``current_device`` -> CPU         parallel groups and seeds; device args become "cpu"
megatron-core's CUDA RNG tracker and seeding     ``odm_megatron.training.cpu_shims`` (the trainer's):
(+ the default causal mask)                      a tracker that forks CPU generator states
``torch.cuda`` RNG get/set                       checkpoints save/restore the CUDA generator; on CPU
                                                 dropout draws from the CPU one, saved as well
``device="cuda"`` / ``Tensor.cuda()``            tensors made or moved to CUDA all over training,
                                                 checkpointing and utils: kept on the CPU
``Stream``/``current_stream``/``stream()``/      DDP's side stream, timers and saves synchronise
``synchronize()``/``Event``                      with CUDA streams; on CPU everything is in order
``compile_helpers()``                            runs ``make`` (pybind11, a compiler) in the tree's
                                                 ``megatron/core/datasets``; the installed
                                                 megatron-core wheel's compiled helpers are used
``legacy.fused_kernels.load`` (0.16)             runs ``$CUDA_HOME/bin/nvcc``
``Tensor.type()`` string                         ``clip_grad_by_total_norm_fp32`` and the optimizers
                                                 assert ``'torch.cuda.FloatTensor'``
``torch.cuda.get_device_properties``             ``validate_args`` reads the major version (TP > 1)
``torch._dynamo`` disabled                       start-up only: a ~30 s compile warm-up of fused
                                                 functions the CPU run never uses
===============================================  ====================================================

Also important on CPU, and handled by the integration itself (not a stand-in): Megatron builds
its DataLoader iterators after ``load_checkpoint`` and each draws a seed from the global CPU RNG,
which on CPU is also dropout's; the online train loader has its own generator, and
:func:`apply` gives Megatron's validation/test loaders one too, so a resumed CPU run is identical.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
import types
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_applied = False
_mode = None

BATCH_INVARIANT = "megatron.core.transformer.custom_layers.batch_invariant_kernels"


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class CudaToCpu(TorchFunctionMode):
    """``device="cuda"`` in factory functions and ``.to("cuda")`` / ``.cuda()`` stay on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Stream:
    """A CUDA stream stand-in: on CPU, work is already in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def wait_event(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _Event()

    def query(self) -> bool:
        return True


class _Event(_Stream):
    def record(self, *args: Any) -> None:
        pass

    def wait(self, *args: Any) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DeviceProperties:
    name = "cpu (odm-megatron CPU stand-in)"
    major, minor = 8, 0
    total_memory = 0
    multi_processor_count = 1


def _batch_invariant_stub() -> types.ModuleType:
    module = types.ModuleType(BATCH_INVARIANT)
    module.__doc__ = "odm-megatron CPU stand-in: batch-invariant kernels need triton (a GPU)."

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("--batch-invariant-mode needs triton, i.e. a GPU (odm-megatron CPU stand-in)")

    module.is_batch_invariant_mode_enabled = lambda: False
    module.HAVE_DEEPGEMM_BF16 = False
    module._BATCH_INVARIANT_BACKENDS = ()
    def other(name: str) -> Any:  # every other public name: refuses when used
        if name.startswith("__"):
            raise AttributeError(name)
        return unavailable

    module.__getattr__ = other
    return module


def _allow_no_cuda(initialize_megatron: Callable) -> Callable:
    @functools.wraps(initialize_megatron)
    def initialize_megatron_on_cpu(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return initialize_megatron(*args, **kwargs)

    return initialize_megatron_on_cpu


def _wheel_helpers() -> None:
    """``megatron.core.datasets.helpers_cpp`` from the installed megatron-core wheel when the
    imported ``megatron.core`` (a source checkout) has none compiled."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError:
        pass
    from importlib import metadata

    try:
        files = metadata.files("megatron-core") or []
    except metadata.PackageNotFoundError:
        files = []
    compiled = [f for f in files if "datasets/helpers_cpp" in str(f) and str(f).endswith((".so", ".pyd"))]
    if not compiled:
        raise RuntimeError("megatron.core.datasets.helpers_cpp is not compiled in the checkout and no megatron-core "
                           "wheel provides it: build it (make -C megatron/core/datasets) or pip install megatron-core")
    path = str(compiled[0].locate())
    spec = importlib.util.spec_from_file_location("megatron.core.datasets.helpers_cpp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["megatron.core.datasets.helpers_cpp"] = module
    import megatron.core.datasets as datasets_package

    datasets_package.helpers_cpp = module
    logger.info("CPU stand-in: dataset helpers from the megatron-core wheel (%s)", path)


def _cpu_type(original: Callable) -> Callable:
    @functools.wraps(original)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" and ".cuda." not in name else name

    return type_


def _own_generator(build: Callable) -> Callable:
    @functools.wraps(build)
    def build_pretraining_data_loader_on_cpu(*args: Any, **kwargs: Any) -> Any:
        loader = build(*args, **kwargs)
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(0)  # its iterator's seed draw spares the CPU RNG
        return loader

    return build_pretraining_data_loader_on_cpu


def apply() -> bool:
    """Put the stand-ins in (idempotent); a no-op returning False when a GPU is present."""
    global _applied, _mode
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch._dynamo.config.disable = True
    if importlib.util.find_spec("triton") is None and BATCH_INVARIANT not in sys.modules:
        sys.modules[BATCH_INVARIANT] = _batch_invariant_stub()

    cuda = torch.cuda
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.get_rng_state = lambda device="cuda": torch.zeros(0, dtype=torch.uint8)
    cuda.set_rng_state = lambda state, device="cuda": None
    cuda.get_rng_state_all = lambda: []
    cuda.set_rng_state_all = lambda states: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _Stream()
    cuda.default_stream = lambda device=None: _Stream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.get_device_properties = lambda device=None: _DeviceProperties()
    cuda.get_device_capability = lambda device=None: (8, 0)
    cuda.empty_cache = lambda: None
    torch.Tensor.type = _cpu_type(torch.Tensor.type)
    _mode = CudaToCpu()
    _mode.__enter__()  # for the whole process

    from odm_megatron.training.cpu_shims import apply_cpu_shims

    apply_cpu_shims()  # megatron-core: current_device -> "cpu", CPU RNG tracker and seeding, causal mask
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    tensor_parallel.model_parallel_cuda_manual_seed = tp_random.model_parallel_cuda_manual_seed
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None

    from megatron.core.datasets import utils as dataset_utils

    _wheel_helpers()
    dataset_utils.compile_helpers = lambda: None

    initialize = importlib.import_module("megatron.training.initialize")
    initialize.initialize_megatron = _allow_no_cuda(initialize.initialize_megatron)
    training = importlib.import_module("megatron.training.training")
    training.initialize_megatron = initialize.initialize_megatron
    training.build_pretraining_data_loader = _own_generator(training.build_pretraining_data_loader)
    if importlib.util.find_spec("megatron.legacy") and importlib.util.find_spec("megatron.legacy.fused_kernels"):  # 0.16
        fused_kernels = importlib.import_module("megatron.legacy.fused_kernels")
        fused_kernels.load = lambda args: None
    _applied = True
    logger.info("no GPU: Megatron-LM runs on CPU with odm-megatron's stand-ins (%s)", __name__)
    return True
