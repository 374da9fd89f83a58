"""``odm-megatron train``: pretrain a megatron-core GPT with online data mixing.

One process: ``python -m odm_megatron train ...``; data parallel:
``torchrun --nproc_per_node N -m odm_megatron train ...``. Configuration errors (bad flags,
missing or mismatched manifests, a checkpoint of another run) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import logging
import sys

from odm_megatron.training.arguments import ConfigError, add_arguments as _add_arguments, validate_args

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_arguments(parser)


def format_summary_table(summary) -> str:
    """The per-domain table printed at the end: prior, final weight, validation loss/perplexity."""
    names = summary.domain_names
    width = max(8, *(len(n) for n in [*names, *(summary.last_eval or {}).get("held_out", {})]))
    evals = (summary.last_eval or {}).get("domains", {})
    lines = [f"{'domain':<{width}}  {'prior':>7}  {'weight':>7}  {'val loss':>9}  {'val ppl':>9}"]
    lines.append("-" * len(lines[0]))
    for name, p, w in zip(names, summary.prior, summary.final_weights):
        e = evals.get(name)
        loss = f"{e['loss']:9.4f}" if e else f"{'-':>9}"
        ppl = f"{e['ppl']:9.2f}" if e else f"{'-':>9}"
        lines.append(f"{name:<{width}}  {p:7.3f}  {w:7.3f}  {loss}  {ppl}")
    if summary.last_eval:
        avg = summary.last_eval["average"]
        lines.append("-" * len(lines[0]))
        lines.append(f"{'average':<{width}}  {'':>7}  {'':>7}  {avg['loss']:9.4f}  {avg['ppl']:9.2f}")
    held_out = (summary.last_eval or {}).get("held_out", {})
    if held_out:  # validation domains never trained on (eval_record)
        lines.append("-" * len(lines[0]) + " held-out (not trained on)")
        for name, e in held_out.items():
            lines.append(f"{name:<{width}}  {'-':>7}  {'-':>7}  {e['loss']:9.4f}  {e['ppl']:9.2f}")
        avg = summary.last_eval["held_out_average"]
        lines.append(f"{'average':<{width}}  {'':>7}  {'':>7}  {avg['loss']:9.4f}  {avg['ppl']:9.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from odm_megatron.manifest import ManifestError
    from odm_megatron.output_errors import describe_write_error, is_write_error
    from odm_megatron.training.parallel import LauncherGoneError, die_with_launcher

    try:
        die_with_launcher()  # under torchrun: this worker dies with its launcher
        validate_args(args)
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
            logger.info("torch CPU threads: %d (--threads)", torch.get_num_threads())
        from odm_megatron.training.train import run_training

        summary = run_training(args)
    except (ConfigError, ManifestError, LauncherGoneError) as e:
        print(f"odm-megatron train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not is_write_error(e):
            raise
        # a log or checkpoint write that failed mid-run (full disk, file system gone read-only)
        print(f"odm-megatron train: error: {describe_write_error(e, e.filename or 'an output file', '--save/--log-dir')}",
              file=sys.stderr)
        return 2
    except Exception as e:
        from odm_megatron.training.train import NonFiniteLossError

        if not isinstance(e, NonFiniteLossError):
            raise
        print(f"odm-megatron train: error: {e}", file=sys.stderr)
        return 3
    finally:
        from odm_megatron.training.parallel import teardown

        teardown()
    if summary.extra.get("rank", 0) == 0:
        at = f" (validation at step {summary.last_eval['step']})" if summary.last_eval else ""
        print(f"\nFinished at step {summary.iteration} in {summary.wall_time_s:.1f}s; weights and validation{at}:")
        print(format_summary_table(summary))
    return 0
