"""What differs between Megatron-LM releases, in one table (and nowhere else).

:func:`~.hooks.install` wraps module-level names of ``megatron.training`` at run time. Every
supported release has the same names in ``megatron/training/training.py`` (``pretrain``,
``train_step``, ``dummy_train_step``, ``save_checkpoint``, ``build_pretraining_data_loader``,
``evaluate_and_print_results``), and ``pretrain_gpt.py`` imports ``pretrain`` from
``megatron.training``; what moved is where the ``--odm-*`` flags go in:

- up to 0.17, ``pretrain(..., extra_args_provider=...)`` parses the arguments itself;
- from 0.18, the script calls ``megatron.training.arguments.parse_and_validate_args(
  extra_args_provider=...)`` before ``pretrain(cfg_container, ...)``.

``pretrain``'s other parameters moved too (``cfg_container`` first from 0.18, ``model_provider``
optional and after ``forward_step_func`` from 0.19); the wrapper binds them by name, so the table
need not list them. A release is recognised by ``megatron.core.package_info`` (major.minor) of
the ``megatron`` package that Python imports, i.e. the user's checkout when it is first on
``sys.path``. Anything else is refused with :class:`UnsupportedMegatronError`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .glue import OdmConfigError

__all__ = ["Adapter", "ADAPTERS", "UnsupportedMegatronError", "detect", "megatron_version", "supported_versions"]

TRAINING = "megatron.training.training"
ARGUMENTS = "megatron.training.arguments"
CFG_CONTAINER = "megatron.training.argument_utils:pretrain_cfg_container_from_args"


@dataclass(frozen=True)
class Adapter:
    """How :func:`~.hooks.install` hooks one Megatron-LM release series."""

    series: str
    """``major.minor`` of ``megatron.core.package_info``."""
    tested: str
    """The tag (or commit) this entry was checked against."""
    args_module: str
    """Module whose ``args_function`` receives ``extra_args_provider=``: the ``--odm-*`` flags."""
    args_function: str
    wheel_has_training: bool
    """Whether the megatron-core wheel of this series ships ``megatron.training`` (so that
    ``odm-megatron pretrain-gpt`` runs without a checkout)."""
    cfg_container: Optional[str] = None
    """``module:function`` that turns parsed args into ``pretrain``'s first argument (0.18+:
    ``PretrainConfigContainer``); None: ``pretrain`` parses the arguments itself."""

    # Module-level names wrapped in every release (the same in all rows today; here so that a
    # release that renames one gets its own row instead of an ``if``).
    training_module: str = TRAINING
    pretrain: str = "pretrain"
    train_step: str = "train_step"
    dummy_train_step: str = "dummy_train_step"
    save_checkpoint: str = "save_checkpoint"
    data_loader: str = "build_pretraining_data_loader"
    evaluate: str = "evaluate_and_print_results"


ADAPTERS: Dict[str, Adapter] = {
    a.series: a
    for a in (
        Adapter("0.16", "core_v0.16.1", TRAINING, "pretrain", wheel_has_training=False),
        Adapter("0.17", "core_v0.17.1", TRAINING, "pretrain", wheel_has_training=True),
        Adapter("0.18", "core_v0.18.2", ARGUMENTS, "parse_and_validate_args", wheel_has_training=True,
                cfg_container=CFG_CONTAINER),
        Adapter("0.19", "core_v0.19.0 (package_info 0.19.1), wheel 0.19.2", ARGUMENTS, "parse_and_validate_args",
                wheel_has_training=True, cfg_container=CFG_CONTAINER),
        Adapter("0.20", "main at d98e8a6 (package_info 0.20.0)", ARGUMENTS, "parse_and_validate_args",
                wheel_has_training=True, cfg_container=CFG_CONTAINER),
    )
}


class UnsupportedMegatronError(OdmConfigError):
    """The ``megatron`` package on ``sys.path`` is not a release this integration supports."""


def supported_versions() -> str:
    return ", ".join(f"{a.series}.x ({a.tested})" for a in ADAPTERS.values())


def megatron_version() -> Tuple[str, Optional[str]]:
    """(version string, path of the ``megatron.core`` package) of what ``import megatron`` finds."""
    try:
        info = importlib.import_module("megatron.core.package_info")
    except ImportError:
        return "none", None
    version = getattr(info, "__version__", None) or f"{info.MAJOR}.{info.MINOR}.{info.PATCH}"
    core = importlib.import_module("megatron.core")
    return str(version), getattr(core, "__path__", [None])[0]


def detect(version: Optional[str] = None) -> Adapter:
    """The adapter for ``version`` (default: the imported megatron-core's), or a one-line
    :class:`UnsupportedMegatronError` naming the detected and the supported versions."""
    where = None
    if version is None:
        version, where = megatron_version()
    series = ".".join(version.split(".")[:2])
    adapter = ADAPTERS.get(series)
    if adapter is None:
        found = f"megatron-core {version}" + (f" at {where}" if where else "")
        raise UnsupportedMegatronError(
            f"odm-megatron's Megatron-LM integration does not support {found}; supported: "
            f"{supported_versions()} (put a supported Megatron-LM checkout first on PYTHONPATH)")
    return adapter
