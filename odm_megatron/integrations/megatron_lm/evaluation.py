"""Per-domain validation in Megatron-LM runs: the paper's metric, in the trainer's ``eval.jsonl``.

Megatron-LM evaluates on its own validation split (a megatron-core ``BlendedDataset`` over the
``--data-path`` prefixes, or ``--valid-data-path`` / the ``valid`` entry of
``--per-split-data-args-path``) and reports one pooled loss. Its batches carry ``dataset_id``
(the prefix's index in that blend), so the per-token losses that its loss function already gets
are summed per validation domain here, on the device (no host synchronisation per micro-batch).
At the end of each evaluation the sums are all-reduced once and written, on rank 0, as one
:func:`odm_megatron.training.evaluate.eval_record` line of ``<save>/odm/eval.jsonl`` (``step``:
Megatron's iteration, the number of steps completed, 1-based like every ODM log), and as
TensorBoard scalars ``odm/eval/{loss,ppl}/<domain>`` where Megatron has a writer; so
``odm-megatron plot <save>/odm`` reads a Megatron-LM run as it reads a trainer run.

Who contributes: the loss function runs only on the last pipeline stage, and only ranks that
read data (tensor-parallel rank 0) see ``dataset_id``; data- and context-parallel ranks hold
different tokens, so a sum over the world is the total. Validation domains that were not trained
on are reported apart (``held_out``); trained domains without validation data are named once at
start-up.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from odm_megatron.dataset import domain_name_from_prefix
from odm_megatron.training.evaluate import eval_record
from odm_megatron.training.metrics import truncate_step_log

logger = logging.getLogger(__name__)

EVAL_LOG = "eval.jsonl"


def valid_prefixes(args: Any) -> Optional[List[str]]:
    """The validation prefixes in Megatron's order (the ``dataset_id`` of its validation blend),
    or None when Megatron builds no validation split from files (``--mock-data``)."""
    from .glue import _blend_list, _parse_blend

    per_split_file = getattr(args, "per_split_data_args_path", None)
    if per_split_file:
        with open(per_split_file, encoding="utf-8") as f:
            valid = _blend_list(json.load(f).get("valid"))
        return _parse_blend(valid)[0] if valid else None
    valid = _blend_list(getattr(args, "valid_data_path", None))
    if valid:
        return _parse_blend(valid)[0]
    if getattr(args, "train_data_path", None):  # per-split paths without a validation entry
        return None
    data_args_file = getattr(args, "data_args_path", None)
    if data_args_file:
        with open(data_args_file, encoding="utf-8") as f:
            return _parse_blend(f.read().split())[0]
    data = _blend_list(getattr(args, "data_path", None))
    return _parse_blend(data)[0] if data else None


def valid_domain_names(prefixes: Sequence[str], train_prefixes: Sequence[str], train_names: Sequence[str]) -> List[str]:
    """A validation prefix that is also a training prefix gets the training domain's name (so
    ``--odm-domain-names`` applies); any other its basename."""
    by_prefix = dict(zip(train_prefixes, train_names))
    return [by_prefix.get(p, domain_name_from_prefix(p)) for p in prefixes]


class DomainValidation:
    """Per-domain loss sums of the evaluation in progress, and the record written after it.

    ``names``: the validation domains in ``dataset_id`` order; ``trained``: the training
    mixture's domain names; ``log_dir``: where ``eval.jsonl`` goes (None: TensorBoard only).
    """

    def __init__(self, names: Sequence[str], trained: Sequence[str], log_dir: Optional[str],
                 device: torch.device, resume_step: int = 0) -> None:
        self.names = list(names)
        self.trained = list(trained)
        self.log_path = os.path.join(log_dir, EVAL_LOG) if log_dir else None
        self.sums = torch.zeros(len(self.names), 2, dtype=torch.float64, device=device)  # [loss sum, tokens]
        self.collecting = False
        self.last_step: Optional[int] = None
        if self.log_path and _is_rank0():
            os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
            truncate_step_log(self.log_path, resume_step)  # a resumed run rewrites what came after its checkpoint
        missing = [n for n in self.trained if n not in self.names]
        if _is_rank0():
            if missing:
                logger.info("per-domain validation: trained domains without validation data: %s", missing)
            held_out = [n for n in self.names if n not in self.trained]
            if held_out:
                logger.info("per-domain validation: held-out domains (validated, not trained on): %s", held_out)

    def start(self) -> None:
        self.sums.zero_()
        self.collecting = True

    def add(self, losses: torch.Tensor, loss_mask: torch.Tensor, dataset_id: Optional[torch.Tensor]) -> None:
        """One micro-batch's per-token losses ``[b, s]`` (any shape with ``b * s`` elements) by
        sample domain ``dataset_id`` ``[b]`` (None: a validation set of a single prefix)."""
        if not self.collecting:
            return
        mask = loss_mask.detach().reshape(-1).to(device=self.sums.device, dtype=torch.float64)
        if dataset_id is None:
            if len(self.names) != 1:
                raise ValueError(f"validation batch without dataset_id, but {len(self.names)} validation domains")
            dataset_id = torch.zeros(1, dtype=torch.long, device=self.sums.device)
        ids = dataset_id.detach().reshape(-1).to(device=self.sums.device, dtype=torch.long)
        b = ids.numel()
        if mask.numel() % b != 0 or losses.numel() != mask.numel():
            raise ValueError(f"per-domain validation: cannot split losses {tuple(losses.shape)} / loss mask "
                             f"{tuple(loss_mask.shape)} into {b} samples")
        per_token = losses.detach().reshape(b, -1).to(torch.float64) * mask.reshape(b, -1)
        self.sums[:, 0].index_add_(0, ids, per_token.sum(dim=1))
        self.sums[:, 1].index_add_(0, ids, mask.reshape(b, -1).sum(dim=1))

    def finish(self, step: int, writer: Any = None) -> Optional[Dict[str, Any]]:
        """Sum over ranks (collective) and write the record of the evaluation after ``step``
        completed steps; returns it (None for a repeat of the step just recorded)."""
        self.collecting = False
        totals = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() != "nccl":
                totals = totals.cpu()
            dist.all_reduce(totals)
        if self.last_step == step:  # Megatron's end-of-training validation repeats the last one
            return None
        self.last_step = step
        totals = totals.cpu()
        record = eval_record(step, {n: float(totals[d, 0]) for d, n in enumerate(self.names)},
                             {n: float(totals[d, 1]) for d, n in enumerate(self.names)}, self.trained)
        if _is_rank0():
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            held_out = {n: round(r["ppl"], 3) for n, r in record.get("held_out", {}).items()}
            logger.info("odm validation at step %d: ppl %s | average %.3f, token-weighted %.3f%s", step,
                        {n: round(r["ppl"], 3) for n, r in record["domains"].items()},
                        record["average"]["ppl"], record["token_weighted"]["ppl"],
                        f" | held out {held_out}" if held_out else "")
        if writer is not None:
            for section in ("domains", "held_out"):
                for name, r in record.get(section, {}).items():
                    if r["tokens"] > 0:
                        writer.add_scalar(f"odm/eval/loss/{name}", r["loss"], step)
                        writer.add_scalar(f"odm/eval/ppl/{name}", r["ppl"], step)
            writer.add_scalar("odm/eval/ppl/average", record["average"]["ppl"], step)
            writer.add_scalar("odm/eval/ppl/token_weighted", record["token_weighted"]["ppl"], step)
        return record


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
