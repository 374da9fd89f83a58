"""The one place where odm-megatron silences its dependencies' start-up chatter.

Importing megatron-core without Transformer Engine and Apex (every CPU install, and any GPU
install that uses the local layer spec, as odm-megatron does) warns four times that they are
absent and logs three "Megatron-FSDP" INFO lines; none of it concerns odm-megatron's users,
who do not use FSDP or fused kernels through it. Only those exact messages are dropped:
anything else megatron-core says still reaches the user. Installed by ``odm_megatron/__init__``,
so it is in place before any megatron-core module is imported.
"""
from __future__ import annotations

import logging
import warnings

# UserWarnings raised while megatron.core modules are imported (matched on the message start).
# Only the "neither is installed, falling back" notices: a warning about one of them alone may
# matter to a GPU user who meant to use it, and stays.
_WARNING_MESSAGES = (r"Transformer Engine and Apex are not installed",)

# INFO records megatron-core's bundled Megatron-FSDP logs at import, by logger.
_FSDP = "megatron_fsdp"
_LOG_MESSAGES = {
    f"{_FSDP}.mixed_precision": "Using Megatron-FSDP without Transformer Engine.",
    f"{_FSDP}.param_and_grad_buffer": "Detected Megatron Core, using Megatron-FSDP with Megatron.",
    f"{_FSDP}.megatron_fsdp": "Detected Megatron Core, using Megatron-FSDP with Megatron.",
}
_LOGGER_PREFIXES = ("megatron.core.distributed.fsdp.src.", "")  # bundled in megatron-core, or standalone


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


def install() -> None:
    """Drop the messages above (idempotent)."""
    for message in _WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron(_fsdp)?\.")
    for name, message in _LOG_MESSAGES.items():
        for prefix in _LOGGER_PREFIXES:
            logger = logging.getLogger(prefix + name)
            if not any(isinstance(f, _DropMessage) and f.message == message for f in logger.filters):
                logger.addFilter(_DropMessage(message))
