"""The online-mixing settings: one validated config and one flag vocabulary for every front end.

``odm-megatron train``, the Megatron-LM integration and the DeepSpeed glue read the user's mixing
settings the same way::

    add_odm_args(parser)                       # --odm-policy --odm-prior --odm-update-interval ...
    args = parser.parse_args()
    odm = OdmConfig.from_args(args)            # validated once; ConfigError names the flag
    prior = odm.resolve_prior(names, natural_weights)            # once the domains are known
    mixer = OnlineMixer(odm.mixer_config(names, seed, global_batch_size), prior, ...)

Each rule lives in one place. The schedule (update interval >= 1, lag >= 0) and the known policy
names are checked by :func:`check_schedule`, which :class:`~odm_megatron.mixer.MixerConfig` also
calls. The bounds of each policy's hyperparameters are the policy class's own (``policy.py``:
for example ``alpha`` in [0, 1) for every bandit policy, ``eta`` > 0 and ``trend_alpha`` in
(alpha, 1) for odm-progress); :class:`OdmConfig` asks the policy by building it once on a dummy
prior, and reports a refusal against the ``--odm-*`` flag that caused it. The prior's syntax is
checked here when the config is made; its length, once the domains are known, by
:meth:`OdmConfig.resolve_prior`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import numbers
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set

import numpy as np

from odm_megatron.errors import ConfigError
from odm_megatron.policy import DEFAULT_POLICY, POLICIES, make_policy

if TYPE_CHECKING:  # the mixer imports this module (check_schedule); import it back only lazily
    from odm_megatron.mixer import MixerConfig

__all__ = [
    "ConfigError", "OdmConfig", "add_odm_args", "check_schedule", "resolve_prior", "POLICY_HYPERPARAMETERS",
    "PRIOR_KEYWORDS", "DEFAULT_UPDATE_INTERVAL", "DEFAULT_LAG",
]

DEFAULT_UPDATE_INTERVAL = 1
"""Optimizer steps per policy update. 1: the paper's setting (ODM updates after every step); the
update is one small all-reduce, well under 1% of a step (docs/benchmarks.md)."""

DEFAULT_LAG = 2
"""Steps between a policy update and the first step sampled with its weights: covers a data
loader prefetching two steps ahead."""

PRIOR_KEYWORDS = ("natural", "uniform")

# flag -> (OdmConfig field = policy keyword, argparse type, metavar, help). A flag left out keeps the
# policy's own default; the bounds are the policy's (policy.py), checked by OdmConfig.
POLICY_HYPERPARAMETERS: Dict[str, tuple] = {
    "--odm-alpha": ("alpha", float, "A",
                    "smoothing factor of the policy's running estimate, in [0, 1): higher reacts more "
                    "slowly (default: the policy's own: 0.9 for odm-exp3 and odm-progress, 0.5 for "
                    "smoothed-mean; static takes none)"),
    "--odm-eta": ("eta", float, "ETA",
                  "odm-progress only: step size of its exponentiated-gradient weight update, > 0 "
                  "(default 0.05)"),
    "--odm-trend-alpha": ("trend_alpha", float, "A",
                          "odm-progress only: estimate each domain's loss trend from a slower EMA with this "
                          "factor, in (--odm-alpha, 1), against the --odm-alpha one (default: the one-update "
                          "change of the --odm-alpha EMA)"),
    "--odm-warmup-updates": ("warmup_updates", int, "N",
                             "policy updates that observe losses but keep sampling the prior, >= 0 (default 0)"),
}

_FLAG_OF = {keyword: flag for flag, (keyword, *_) in POLICY_HYPERPARAMETERS.items()}
_TRIAL_PRIOR = np.array([0.5, 0.5])  # policies are built once on this to check their hyperparameters


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_schedule(policy: str, update_interval: Any, lag: Any) -> None:
    """The rules every front end and :class:`~odm_megatron.mixer.MixerConfig` share: a known
    policy, ``update_interval >= 1`` and ``lag >= 0`` (integers). Raises :class:`ConfigError`."""
    if policy not in POLICIES:
        raise ConfigError(f"--odm-policy {policy!r}: unknown policy; choose one of {', '.join(sorted(POLICIES))}")
    if not _is_int(update_interval) or update_interval < 1:
        raise ConfigError(f"--odm-update-interval (optimizer steps per policy update) must be an integer >= 1, "
                          f"got {update_interval!r}")
    if not _is_int(lag) or lag < 0:
        raise ConfigError(f"--odm-lag (steps between a policy update and its use) must be an integer >= 0, "
                          f"got {lag!r}")


def _accepted_keywords(policy: str) -> Optional[Set[str]]:
    """The hyperparameters ``policy``'s constructor takes (None: it takes any keyword)."""
    params = inspect.signature(POLICIES[policy]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in params.items() if p.kind in kinds} - {"prior"}


def _check_prior_syntax(spec: Any) -> None:
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--odm-prior must be natural, uniform, W1,W2,... or FILE.json, got {spec!r}")
    if spec in PRIOR_KEYWORDS:
        return
    if spec.endswith(".json") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ConfigError(f"--odm-prior {spec}: no such file (give natural, uniform, W1,W2,... or an "
                              f"existing FILE.json)")
        return
    _weights_from_list(spec)


def _weights_from_list(spec: str, flag: str = "--odm-prior") -> np.ndarray:
    try:
        w = np.array([float(x) for x in spec.split(",")], dtype=np.float64)
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected natural, uniform, W1,W2,... (numbers in domain "
                          f"order) or FILE.json") from None
    _check_weights(w, spec, flag)
    return w


def _check_weights(w: np.ndarray, spec: str, flag: str = "--odm-prior") -> None:
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ConfigError(f"{flag} {spec!r}: weights must be finite, non-negative and not all zero, "
                          f"got {w.tolist()}")


def _weights_from_json(path: str, domain_names: Sequence[str], flag: str) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read a JSON prior ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("weights"), dict):
        raw = raw["weights"]
    if not isinstance(raw, dict):
        raise ConfigError(f"{flag} {path}: expected a JSON object {{domain: weight}}")
    missing = [n for n in domain_names if n not in raw]
    extra = [n for n in raw if n not in domain_names]
    if missing or extra:
        raise ConfigError(f"{flag} {path}: domains differ from the data (missing {missing}, unknown {extra})")
    try:
        return np.array([float(raw[n]) for n in domain_names], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {path}: weights must be numbers") from None


def resolve_prior(spec: str, domain_names: Sequence[str], natural_weights: Sequence[float],
                  flag: str = "--odm-prior") -> np.ndarray:
    """``natural`` | ``uniform`` | ``W1,W2,...`` (domain order) | a JSON file (``{domain: weight}``
    or ``{"weights": {...}}``, naming every domain and no other) -> weights summing to one.

    ``natural_weights``: what "natural" means for the caller (tokens per domain, or Megatron's
    ``--data-path`` weights). Raises :class:`ConfigError` naming ``flag``.
    """
    k = len(domain_names)
    if spec == "natural":
        w = np.asarray(natural_weights, dtype=np.float64)
        if w.shape != (k,):
            raise ConfigError(f"{flag} natural: {w.size} natural weights for {k} domains {list(domain_names)}")
    elif spec == "uniform":
        w = np.ones(k, dtype=np.float64)
    elif spec.endswith(".json") or os.path.isfile(spec):
        w = _weights_from_json(spec, domain_names, flag)
    else:
        w = _weights_from_list(spec, flag)
        if w.shape != (k,):
            raise ConfigError(f"{flag} {spec}: {w.size} weights for {k} domains {list(domain_names)} "
                              f"(give one weight per domain, in this order)")
    _check_weights(w, spec, flag)
    return w / w.sum()


@dataclass
class OdmConfig:
    """The user's online-mixing settings, validated once (``__post_init__``), the same for the
    trainer, the Megatron-LM integration and the DeepSpeed glue. Errors are :class:`ConfigError`
    with one line naming the ``--odm-*`` flag."""

    policy: str = DEFAULT_POLICY
    """Name of the mixing policy (``policy.POLICIES``)."""
    prior: str = "natural"
    """natural | uniform | W1,W2,... (domain order) | FILE.json: the weights the policy starts from."""
    update_interval: int = DEFAULT_UPDATE_INTERVAL
    """Optimizer steps per policy update (>= 1)."""
    lag: int = DEFAULT_LAG
    """Steps between a policy update and the first step sampled with its weights (>= 0)."""
    alpha: Optional[float] = None
    """Policy hyperparameters; None keeps the policy's own default."""
    eta: Optional[float] = None
    trend_alpha: Optional[float] = None
    warmup_updates: Optional[int] = None
    domain_names: Optional[List[str]] = None
    """One name per data prefix (None: derived from the prefixes by the front end)."""
    log: Optional[str] = None
    """Path of the JSON-lines update log (None: the front end's default)."""

    def __post_init__(self) -> None:
        check_schedule(self.policy, self.update_interval, self.lag)
        self.update_interval, self.lag = int(self.update_interval), int(self.lag)
        _check_prior_syntax(self.prior)
        self._check_hyperparameters()
        if self.domain_names is not None:
            if isinstance(self.domain_names, str) or not self.domain_names:
                raise ConfigError(f"--odm-domain-names takes one or more names, got {self.domain_names!r}")
            self.domain_names = [str(n) for n in self.domain_names]
            duplicates = sorted({n for n in self.domain_names if self.domain_names.count(n) > 1})
            if duplicates:
                raise ConfigError(f"--odm-domain-names names {duplicates} more than once")
        if self.log is not None and (not isinstance(self.log, str) or not self.log):
            raise ConfigError(f"--odm-log must be a file path, got {self.log!r}")

    def _check_hyperparameters(self) -> None:
        accepted = _accepted_keywords(self.policy)
        given: Dict[str, Any] = {}
        for flag, (keyword, *_) in POLICY_HYPERPARAMETERS.items():
            value = getattr(self, keyword)
            if value is None:
                continue
            if accepted is not None and keyword not in accepted:
                takes = ", ".join(_FLAG_OF.get(k, k) for k in sorted(accepted)) or "none"
                raise ConfigError(f"{flag} does not apply to --odm-policy {self.policy} (its settings: {takes})")
            if keyword == "warmup_updates" and not _is_int(value):
                raise ConfigError(f"{flag} must be an integer, got {value!r}")
            if keyword != "warmup_updates" and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
                raise ConfigError(f"{flag} must be a number, got {value!r}")
            given[keyword] = value
            try:  # the policy's own bounds (policy.py), one flag at a time so the error names it
                make_policy(self.policy, _TRIAL_PRIOR, **given)
            except ValueError as e:
                raise ConfigError(f"{flag} {value}: {e}") from None

    # -- what the front ends need ---------------------------------------------------------------
    def policy_kwargs(self) -> Dict[str, Any]:
        """The hyperparameters that were set: ``make_policy(self.policy, prior, **these)``."""
        return {keyword: getattr(self, keyword) for keyword, *_ in POLICY_HYPERPARAMETERS.values()
                if getattr(self, keyword) is not None}

    def resolve_prior(self, domain_names: Sequence[str], natural_weights: Sequence[float]) -> np.ndarray:
        """The prior as normalised weights in ``domain_names`` order; ``natural_weights`` is what
        "natural" means for the caller (tokens per domain, Megatron's ``--data-path`` weights, ...).
        Raises :class:`ConfigError` (for example 3 weights for 4 domains)."""
        return resolve_prior(self.prior, domain_names, natural_weights)

    def resolve_domain_names(self, default_names: Sequence[str]) -> List[str]:
        """``--odm-domain-names`` if given (one per data prefix), else ``default_names``."""
        if self.domain_names is None:
            return list(default_names)
        if len(self.domain_names) != len(default_names):
            raise ConfigError(f"--odm-domain-names lists {len(self.domain_names)} names for "
                              f"{len(default_names)} prefixes")
        return list(self.domain_names)

    def mixer_config(self, domain_names: Sequence[str], seed: int, global_batch_size: int) -> "MixerConfig":
        """The :class:`~odm_megatron.mixer.MixerConfig` of these settings for one run."""
        from odm_megatron.mixer import MixerConfig

        try:
            return MixerConfig(domain_names=list(domain_names), seed=seed, global_batch_size=global_batch_size,
                               update_interval=self.update_interval, lag=self.lag, policy=self.policy,
                               policy_kwargs=self.policy_kwargs())
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OdmConfig":
        """From a namespace parsed with :func:`add_odm_args` (reads the ``args.odm_*`` attributes;
        absent or None ones keep their defaults). Raises :class:`ConfigError` if ``--odm-policy``
        is unset (mixing off in Megatron-LM runs: check that first)."""
        if getattr(args, "odm_policy", None) is None:
            raise ConfigError("online data mixing is off: give --odm-policy")
        values = {}
        for f in fields(cls):
            value = getattr(args, "odm_" + f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)


# -- flags ------------------------------------------------------------------------------------------
ODM_GROUP_TITLE = "online data mixing (odm-megatron)"

_POLICY_HELP = {
    "odm-exp3": "the paper's EXP3 (Albalak et al., 2023)",
    "smoothed-mean": "the ODM reference code's smoothed-reward policy",
    "odm-progress": "learning-progress reward",
    "static": "the prior, unchanged (Megatron's fixed blend; a baseline)",
}


def add_odm_args(parser_or_group: Any, *, policy_default: Optional[str] = DEFAULT_POLICY,
                 aliases: bool = False) -> None:
    """Add the ``--odm-*`` flags (``--odm-policy --odm-prior --odm-update-interval --odm-lag
    --odm-alpha --odm-eta --odm-trend-alpha --odm-warmup-updates --odm-domain-names --odm-log``)
    to an argparse parser (in their own group) or group.

    ``policy_default=None``: mixing is off unless ``--odm-policy`` is given (the Megatron-LM
    integration). ``aliases=True`` (``odm-megatron train``) also accepts the trainer's older
    ``--policy``, ``--prior`` and ``--update-interval``. Bounds are checked by
    :class:`OdmConfig` (``OdmConfig.from_args``), so every front end refuses the same values with
    the same message.
    """
    g = parser_or_group
    if isinstance(g, argparse.ArgumentParser):
        g = g.add_argument_group(ODM_GROUP_TITLE)

    def names(flag: str, old: str) -> tuple:
        return (flag, old) if aliases else (flag,)

    policies = sorted(POLICIES)
    described = "; ".join(f"{p}: {_POLICY_HELP[p]}" for p in policies if p in _POLICY_HELP)
    # "%(default)s": argparse fills it in, and a defaults-showing formatter then adds nothing twice
    when = ("default: %(default)s" if policy_default is not None
            else "default: off; giving a policy turns online data mixing on over the --data-path domains")
    g.add_argument(*names("--odm-policy", "--policy"), dest="odm_policy", choices=policies, default=policy_default,
                   metavar="POLICY",
                   help=f"the mixing policy, which re-weights the domains from their training losses: {described} "
                        f"({when})")
    g.add_argument(*names("--odm-prior", "--prior"), dest="odm_prior", default="natural", metavar="PRIOR",
                   help="the weights the policy starts from (static keeps them): natural (the --data-path "
                        "weights if given, else each domain's size), uniform, W1,W2,... (one per domain in "
                        "domain order, normalised), or FILE.json ({domain: weight}) (default: %(default)s)")
    g.add_argument(*names("--odm-update-interval", "--update-interval"), dest="odm_update_interval", type=int,
                   default=DEFAULT_UPDATE_INTERVAL, metavar="N",
                   help="optimizer steps per policy update, >= 1: each update all-reduces the window's "
                        "per-domain losses once and moves the weights (default: %(default)s)")
    g.add_argument("--odm-lag", dest="odm_lag", type=int, default=DEFAULT_LAG, metavar="STEPS",
                   help="steps between a policy update and the first step sampled with its weights, >= 0; "
                        "the data loader may prefetch at most this many steps ahead (default: %(default)s)")
    for flag, (keyword, kind, metavar, text) in POLICY_HYPERPARAMETERS.items():
        g.add_argument(flag, dest="odm_" + keyword, type=kind, default=None, metavar=metavar, help=text)
    g.add_argument("--odm-domain-names", dest="odm_domain_names", nargs="+", default=None, metavar="NAME",
                   help="one name per --data-path prefix, in order (default: each prefix's file name "
                        "without _text_document)")
    g.add_argument("--odm-log", dest="odm_log", default=None, metavar="FILE",
                   help="JSON-lines log of every policy update (default: <save>/odm/mixture.jsonl)")
