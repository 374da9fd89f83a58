"""Options shared by ``odm-megatron train`` and the Megatron-LM glue: the prior and the policy's
hyperparameter flags, so both front ends read them the same way."""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Sequence

import numpy as np


class PriorError(ValueError):
    """A prior specification that cannot be turned into weights (one-line message)."""


def resolve_prior(spec: str, domain_names: Sequence[str], natural_weights: Sequence[float],
                  flag: str = "--prior") -> np.ndarray:
    """``natural`` | ``uniform`` | ``W1,W2,...`` (domain order) | a JSON file (``{domain: weight}``
    or ``{"weights": {...}}``, naming every domain and no other) -> weights summing to one."""
    k = len(domain_names)
    if spec == "natural":
        w = np.asarray(natural_weights, dtype=np.float64)
    elif spec == "uniform":
        w = np.ones(k, dtype=np.float64)
    elif spec.endswith(".json") or os.path.isfile(spec):
        w = _weights_from_json(spec, domain_names, flag)
    else:
        try:
            w = np.array([float(x) for x in spec.split(",")], dtype=np.float64)
        except ValueError:
            raise PriorError(f"{flag} {spec!r}: expected natural, uniform, W1,W2,... or FILE.json") from None
        if w.shape != (k,):
            raise PriorError(f"{flag} gives {w.size} weights for {k} domains {list(domain_names)}")
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise PriorError(f"{flag} {spec!r}: weights must be non-negative and not all zero, got {w.tolist()}")
    return w / w.sum()


def _weights_from_json(path: str, domain_names: Sequence[str], flag: str) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PriorError(f"{flag} {path}: cannot read a JSON prior ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("weights"), dict):
        raw = raw["weights"]
    if not isinstance(raw, dict):
        raise PriorError(f"{flag} {path}: expected a JSON object {{domain: weight}}")
    missing = [n for n in domain_names if n not in raw]
    extra = [n for n in raw if n not in domain_names]
    if missing or extra:
        raise PriorError(f"{flag} {path}: domains differ from the data (missing {missing}, unknown {extra})")
    try:
        return np.array([float(raw[n]) for n in domain_names], dtype=np.float64)
    except (TypeError, ValueError):
        raise PriorError(f"{flag} {path}: weights must be numbers") from None


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


# flag -> (policy keyword, type, help); a flag left out keeps the policy's own default
POLICY_HYPERPARAMETERS = {
    "--odm-alpha": ("alpha", float, "smoothing of the policy (default: the policy's own, 0.9 for odm-exp3 "
                                    "and odm-progress, 0.5 for smoothed-mean)"),
    "--odm-eta": ("eta", float, "step size of odm-progress's exponentiated-gradient update (default 0.05)"),
    "--odm-trend-alpha": ("trend_alpha", float,
                          "odm-progress: estimate each domain's loss trend from a slow EMA with this factor "
                          "against the --odm-alpha one (default: the one-update change of the EMA)"),
    "--odm-warmup-updates": ("warmup_updates", non_negative_int,
                             "policy updates that observe but keep the prior (default 0)"),
}


def add_policy_hyperparameter_args(group: Any) -> None:
    """Add the ``--odm-*`` policy hyperparameter flags to an argparse parser or group."""
    for flag, (_, kind, text) in POLICY_HYPERPARAMETERS.items():
        group.add_argument(flag, type=kind, default=None, help=text)


def policy_hyperparameters(args: argparse.Namespace) -> Dict[str, Any]:
    """The policy keywords of the flags that were given (``make_policy(name, prior, **these)``)."""
    out = {}
    for flag, (keyword, _, _) in POLICY_HYPERPARAMETERS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out[keyword] = value
    return out
