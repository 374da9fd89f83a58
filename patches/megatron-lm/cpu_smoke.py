"""CPU smoke test of the *patched* Megatron-LM functions (no GPU, no model training).

Usage (after ``git apply odm.patch`` in a Megatron-LM checkout of the pinned tag)::

    python patches/megatron-lm/cpu_smoke.py /path/to/Megatron-LM

What it runs, on one gloo process, with Megatron-LM's own code wherever it can run on a CPU:

- Megatron's ``parse_args`` / ``validate_args`` with the ``--odm-*`` flags (``with_odm_args``);
- the patched ``train_valid_test_datasets_provider`` (per-domain GPTDatasets + OnlineBlendedDataset
  for train, megatron-core BlendedDatasets for valid/test) on tiny synthetic indexed datasets;
- the loader that the patched ``build_train_valid_test_data_loaders`` builds, wrapped in Megatron's
  ``RerunDataIterator``;
- the patched ``forward_step`` (``get_batch`` through the dataset-id tap, Megatron's
  ``get_batch_on_this_tp_rank``) and ``loss_func`` (the loss hook) with a stand-in model that
  returns per-token cross entropy, then ``odm_step_end`` and ``odm_save_state`` as the patched
  ``train()`` / ``save_checkpoint_and_time`` call them;
- evaluation (``model.eval()``) feeds nothing to the bandit;
- a resume from the saved bandit state reproduces the uninterrupted run's stream and weights.

It imports megatron.core from the pip megatron-core package (same version as the tag) and the
rest from the checkout. CPU stand-ins, and nothing else: ``Tensor.cuda`` is the identity and ``torch.cuda.current_device``
is ``"cpu"`` (Megatron's ``get_batch_on_this_tp_rank`` moves and broadcasts batches with them), and megatron.core's triton-only ``batch_invariant_kernels`` module is replaced by a mock
(triton is not installable without a GPU). Not exercised: the real ``train()`` loop and
``save_checkpoint`` (CUDA-only), TP/PP/CP layouts, a real GPTModel.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from unittest import mock

import numpy as np


def _write_domains(directory: str, sizes, vocab: int, eod: int):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    rng = np.random.default_rng(0)
    weights_and_prefixes = []
    for d, (name, n_docs) in enumerate(sizes):
        prefix = os.path.join(directory, f"{name}_text_document")
        builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
        lo = 1 + d * 100
        for _ in range(n_docs):
            doc = np.append(rng.integers(lo, lo + 100, size=40), eod)
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
        builder.finalize(get_idx_path(prefix))
        weights_and_prefixes += ["1", prefix]
    return weights_and_prefixes


def main(megatron_lm_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.modules["megatron.core.transformer.custom_layers.batch_invariant_kernels"] = mock.MagicMock()
    # Appended, not prepended: megatron.core then comes from the pip megatron-core (0.16.1, with its
    # compiled dataset helpers; the tag's megatron/core/*.py are byte-identical to it), while
    # megatron.training, pretrain_gpt, ... come from the checkout (``megatron`` is a namespace package).
    sys.path.append(os.path.abspath(megatron_lm_dir))
    import torch
    import torch.distributed as dist

    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU stand-ins for Megatron's batch moves
    torch.cuda.current_device = lambda: "cpu"

    import pretrain_gpt
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import RerunDataIterator
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables
    from megatron.training.training import get_train_valid_test_num_samples

    from odm_megatron.integrations import megatron_lm as odm_lm

    work = tempfile.mkdtemp(prefix="odm-mlm-smoke-")
    vocab, eod = 512, 0
    data_path = _write_domains(work, [("web", 60), ("code", 30), ("books", 90)], vocab, eod)
    gbs, mbs, steps, save_at = 8, 2, 8, 5
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.argv = ["pretrain_gpt.py", "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
                "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", str(mbs),
                "--global-batch-size", str(gbs), "--train-iters", str(steps), "--lr", "1e-3",
                "--eval-iters", "1", "--eval-interval", "4", "--split", "90,5,5",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab - 1),
                "--data-path", *data_path, "--data-cache-path", os.path.join(work, "cache"),
                "--save", os.path.join(work, "ckpt"), "--save-interval", "100", "--num-workers", "1",
                "--odm-policy", "odm-exp3", "--odm-update-interval", "2", "--odm-lag", "2"]
    args = parse_args(extra_args_provider=odm_lm.with_odm_args(None))
    validate_args(args)
    set_global_variables(args, build_tokenizer=False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True

    class StandInModel(torch.nn.Module):
        """What GPTModel returns with labels: per-token cross entropy [b, s]."""

        vp_stage = None

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, 8)
            self.head = torch.nn.Linear(8, vocab)

        def forward(self, tokens, position_ids, attention_mask, labels=None, loss_mask=None, packed_seq_params=None):
            logits = self.head(self.embed(tokens))
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")

    torch.manual_seed(0)
    model = StandInModel()

    def run(start: int, stop: int, save_at=None):
        odm_lm.reset()
        args.iteration, args.consumed_train_samples = start, start * gbs
        args.load = args.save if start else None
        train_ds, valid_ds, _ = pretrain_gpt.train_valid_test_datasets_provider(get_train_valid_test_num_samples())
        mixer = odm_lm.get_mixer()
        assert type(train_ds).__name__ == "OnlineBlendedDataset", type(train_ds)
        assert type(valid_ds).__name__ == "BlendedDataset" and len(valid_ds) > 0
        loader = odm_lm.build_odm_dataloader(train_ds, args)  # as the patched training.py does
        it = RerunDataIterator(iter(loader))
        stream, weights = [], {}
        micro_batches = gbs // mbs
        for step in range(start, stop):
            model.train()
            for _ in range(micro_batches):
                before = mixer.accumulator.stats.clone()
                output, loss_fn = pretrain_gpt.forward_step(it, model)
                loss, num_tokens, _ = loss_fn(output)
                assert not torch.equal(before, mixer.accumulator.stats), "loss hook recorded nothing"
                stream.append(loss.item())
            odm_lm.odm_step_end(step)  # the patched train(): every rank, after every step
            weights[step] = mixer.weights_for_step(step).tolist()
            if step + 1 == save_at:
                assert odm_lm.odm_save_state(args, step + 1) is not None
            if (step + 1) % 4 == 0:  # evaluation must not feed the bandit
                model.eval()
                valid_it = RerunDataIterator(iter(torch.utils.data.DataLoader(valid_ds, batch_size=mbs)))
                before = mixer.accumulator.stats.clone()
                output, loss_fn = pretrain_gpt.forward_step(valid_it, model)
                loss_fn(output)
                assert torch.equal(before, mixer.accumulator.stats), "evaluation fed the bandit"
        weights["latest"] = mixer.latest_weights.tolist()
        return stream, weights, mixer.state_dict()

    full_stream, full_weights, full_state = run(0, steps, save_at=save_at)
    assert not np.allclose(full_weights["latest"], full_weights[0]), "the bandit never moved the weights"
    # The stand-in model is never updated, so a micro-batch's loss is a function of its samples:
    # equal losses from save_at on mean the resumed run reads the same stream.
    resumed_stream, resumed_weights, resumed_state = run(save_at, steps)
    assert resumed_stream == full_stream[save_at * (gbs // mbs):], "sample stream differs after resume"
    assert resumed_weights == {s: w for s, w in full_weights.items() if s == "latest" or s >= save_at}, \
        "weights differ after resume"
    assert resumed_state == full_state, "bandit state differs after resume"
    mixture = os.path.join(args.save, "odm", "mixture.jsonl")
    assert os.path.isfile(mixture) and os.path.isfile(odm_lm.state_path(args.save, save_at))
    logging.getLogger("cpu_smoke").info("OK: patched provider, loader, forward_step/loss_func hooks, step_end, "
                                        "save/resume")
    dist.destroy_process_group()
    shutil.rmtree(work, ignore_errors=True)  # kept on failure, for a look


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    main(sys.argv[1])
