"""Deprecated: the mixing options moved to :mod:`odm_megatron.config` (``OdmConfig``,
``add_odm_args``). This module only re-exports the old names until every importer has switched
(the Megatron-LM integration imports them today); new code imports from ``odm_megatron.config``.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

from odm_megatron.config import POLICY_HYPERPARAMETERS, resolve_prior
from odm_megatron.errors import ConfigError

PriorError = ConfigError
"""The old name of the prior's error: the same class as :class:`odm_megatron.errors.ConfigError`."""

__all__ = ["PriorError", "resolve_prior", "add_policy_hyperparameter_args", "policy_hyperparameters",
           "non_negative_int", "POLICY_HYPERPARAMETERS"]


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def add_policy_hyperparameter_args(group: Any) -> None:
    """Add the ``--odm-*`` policy hyperparameter flags to an argparse parser or group (prefer
    :func:`odm_megatron.config.add_odm_args`, which adds every ODM flag)."""
    for flag, (keyword, kind, metavar, text) in POLICY_HYPERPARAMETERS.items():
        group.add_argument(flag, dest="odm_" + keyword, type=kind, default=None, metavar=metavar, help=text)


def policy_hyperparameters(args: argparse.Namespace) -> Dict[str, Any]:
    """The policy keywords of the flags that were given (prefer ``OdmConfig.from_args(args).policy_kwargs()``)."""
    return {keyword: getattr(args, "odm_" + keyword) for keyword, *_ in POLICY_HYPERPARAMETERS.values()
            if getattr(args, "odm_" + keyword, None) is not None}
