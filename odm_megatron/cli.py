"""The ``odm-megatron`` command line: one sub-command per job.

Sub-commands live in their own modules and are imported only when chosen, so ``--help`` stays
fast and a missing optional dependency of one job never breaks the others. Each module exposes
``add_arguments(parser)`` and ``main(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("odm_megatron.demo", "build a small corpus from this Python installation and train on it with ODM"),
    "train-tokenizer": ("odm_megatron.preprocess.tokenizer_cli", "train a SentencePiece tokenizer on a sample drawn across domains"),
    "preprocess": ("odm_megatron.preprocess.cli", "turn Pile-format jsonl(.zst/.gz) into per-domain Megatron .bin/.idx shards"),
    "train": ("odm_megatron.training.cli", "pretrain a megatron-core GPT with online data mixing"),
    "plot": ("odm_megatron.training.plot", "plot mixing weights and per-domain validation perplexity from log dirs"),
    "megatron-lm": ("odm_megatron.integrations.megatron_lm.launcher",
                    "run a Megatron-LM script (e.g. pretrain_gpt.py) unmodified, with online data mixing"),
    "pretrain-gpt": ("odm_megatron.integrations.megatron_lm.pretrain_gpt",
                     "Megatron-LM's GPT pretraining from the megatron-core wheel (>= 0.17), with online data mixing"),
}


_TOP_LEVEL_OPTIONS_WITH_VALUE = {"--log-level"}


def _module_for_argv(argv: List[str]) -> Optional[str]:
    """The sub-command named in ``argv``, skipping top-level options and their values."""
    tokens = iter(argv)
    for token in tokens:
        if token in SUBCOMMANDS:
            return token
        if token in _TOP_LEVEL_OPTIONS_WITH_VALUE:
            next(tokens, None)
        elif not token.startswith("-"):
            return None
    return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except where there is none to show (None, False): those flags'
    help says what happens without them."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser(chosen: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="odm-megatron",
        description="Online Data Mixing (ODM) for megatron-core / Megatron-LM / DeepSpeed pretraining.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=_HelpFormatter)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _module_for_argv(argv)
    args = build_parser(chosen).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
