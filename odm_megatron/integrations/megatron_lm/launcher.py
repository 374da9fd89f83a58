"""``odm-megatron megatron-lm SCRIPT [ARGS...]``: a user's unmodified Megatron-LM script, with mixing.

::

    PYTHONPATH=/path/to/Megatron-LM torchrun --nproc-per-node 8 --no-python \\
        odm-megatron megatron-lm /path/to/Megatron-LM/pretrain_gpt.py [Megatron flags] [--odm-* flags]

runs ``pretrain_gpt.py`` as Python would (``__name__ == "__main__"``, ``sys.argv[0]`` the script,
its directory first on ``sys.path``, so the checkout's ``megatron`` package is the one imported,
ahead of the megatron-core wheel's ``megatron.training``) after :func:`~.hooks.install`. ARGS
go to Megatron-LM's own parser, which also knows the ``--odm-*`` flags; online mixing is on with
``--odm-policy`` (default here: odm-megatron's default policy).

The script's module is ``__main__`` with ``__spec__.name == "__main__"``: multiprocessing's
spawn children (``torch_dist`` checkpoints start a result-queue manager that way) then do not
re-import the script, which they would otherwise do without the hooks and the CPU stand-ins.

Nothing here imports ``megatron`` before the script's directory is on ``sys.path``.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import logging
import os
import sys
import types
from typing import List, Optional

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", help="the Megatron-LM training script, e.g. /path/to/Megatron-LM/pretrain_gpt.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="Megatron-LM's flags and the --odm-* flags, parsed by Megatron-LM's own parser "
                             "(here --odm-policy defaults to odm-megatron's default policy: mixing is on)")


def _put_first(path: str) -> None:
    path = os.path.abspath(path)
    sys.path[:] = [path] + [p for p in sys.path if os.path.abspath(p or ".") != path]


def _run_as_main(script: str) -> None:
    with open(script, "rb") as f:
        code = compile(f.read(), script, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = script
    module.__spec__ = importlib.machinery.ModuleSpec("__main__", None, origin=script)
    module.__builtins__ = __builtins__
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def run_script(script: str, script_args: List[str], policy_default: Optional[str] = "default") -> None:
    """Run ``script`` with ``script_args`` as its command line, hooks installed.

    ``policy_default``: ``--odm-policy`` when the flag is absent ("default": the package's
    default policy; None: mixing only with ``--odm-policy``).
    """
    script = os.path.abspath(script)
    if not os.path.isfile(script):
        raise FileNotFoundError(f"{script}: no such script (give the path to e.g. Megatron-LM's pretrain_gpt.py)")
    if "megatron" in sys.modules:
        logger.warning("megatron was imported before %s's directory was put on sys.path: %s", script,
                       getattr(sys.modules["megatron"], "__path__", "?"))
    _put_first(os.path.dirname(script))
    from odm_megatron.policy import DEFAULT_POLICY

    from .hooks import install

    adapter = install(policy_default=DEFAULT_POLICY if policy_default == "default" else policy_default)
    logger.info("Megatron-LM %s (%s) from %s: running %s", adapter.series, adapter.tested,
                os.path.dirname(os.path.dirname(sys.modules["megatron.training"].__file__)), script)
    sys.argv = [script, *script_args]
    _run_as_main(script)


def main(args: argparse.Namespace) -> int:
    try:
        run_script(args.script, list(args.script_args))
    except FileNotFoundError as e:
        logger.error("odm-megatron megatron-lm: %s", e)
        return 2
    except Exception as e:  # noqa: BLE001 - only odm-megatron's own one-line errors are shortened
        from .glue import OdmCheckpointError, OdmConfigError

        if not isinstance(e, (OdmConfigError, OdmCheckpointError)):
            raise
        logger.error("%s", e)
        return 2
    return 0
