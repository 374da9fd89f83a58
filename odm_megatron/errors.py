"""The project's two error types: one for bad settings, one for checkpoints that do not fit.

Every front end (``odm-megatron train``, the Megatron-LM integration, the DeepSpeed glue) raises
these, with a one-line message that names the flag or file and says what to do, so a caller needs
one ``except`` per kind of failure. Older names (``training.arguments.ConfigError``,
``options.PriorError``, the integrations' ``OdmConfigError``/``OdmCheckpointError``) are aliases
or subclasses of these two, so existing ``except`` clauses keep working.
"""
from __future__ import annotations

__all__ = ["ConfigError", "CheckpointError"]


class ConfigError(ValueError):
    """A bad flag, setting or input, or an inconsistent combination of them (the CLIs exit with 2).

    A ``ValueError``: a wrong value given by the user, caught before (or instead of) training.
    """


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or resumed with this run: missing pieces, another run's
    state, or a step count that disagrees between the model's checkpoint and the mixer's."""
