"""Online data mixing inside your own PyTorch training loop: the README's "Library use", runnable.

    python examples/library_usage.py                                   # a tiny corpus made on the fly
    python examples/library_usage.py --manifest DIR/manifest.json      # `odm-megatron preprocess` output

The pieces, in order: a manifest (domain names, shard prefixes, token counts, tokenizer) ->
one megatron-core ``GPTDataset`` per domain -> ``OnlineBlendedDataset`` -> ``OnlineMixer`` (the
bandit, configured by ``OdmConfig``) -> ``OnlineMixingBatchSampler`` -> ``DataLoader``. Each step,
every micro-batch's per-token losses go to ``mixer.accumulate`` and ``mixer.step_end`` updates
the weights; ``mixer.state_dict()`` belongs in your checkpoint. The model is a deliberately tiny
torch LM: the mixer needs per-token losses, whatever produced them (a Megatron ``GPTModel`` in
``odm-megatron train``). On CPU it runs in seconds; under ``torchrun`` pass each rank's
data-parallel rank and size to the sampler and initialise ``torch.distributed`` first (the
mixer then all-reduces the losses).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import List, Optional

import torch

from odm_megatron.config import OdmConfig
from odm_megatron.dataset import OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, make_gpt_dataset_config
from odm_megatron.manifest import Manifest
from odm_megatron.mixer import OnlineMixer
from odm_megatron.sampler import OnlineMixingBatchSampler


def make_tiny_corpus(directory: str) -> str:
    """Pile-format text of five domains -> a SentencePiece tokenizer -> per-domain shards and a
    manifest, with the same two commands you would run on The Pile. Returns the manifest path."""
    from odm_megatron.cli import main as odm_megatron
    from odm_megatron.preprocess.fixtures import make_documents, write_corpus

    docs = {"Pile-CC": 120, "Wikipedia (en)": 60, "DM Mathematics": 40, "Github": 40, "Enron Emails": 20}
    corpus = write_corpus(os.path.join(directory, "corpus.jsonl"), make_documents(docs, words_per_doc=120))
    tokenizer = os.path.join(directory, "tokenizer")
    for argv in (["train-tokenizer", "--input", corpus, "--vocab-size", "400", "--output", tokenizer],
                 ["preprocess", "--input", corpus, "--tokenizer-model", tokenizer + ".model", "--output-dir",
                  os.path.join(directory, "shards"), "--workers", "1", "--append-eod", "--no-progress"]):
        if odm_megatron(["--log-level", "WARNING", *argv]) != 0:
            raise SystemExit(f"odm-megatron {argv[0]} failed (its message is above)")
    return os.path.join(directory, "shards", "manifest.json")


class TinyLM(torch.nn.Module):
    """Embedding -> linear: enough to give each domain its own, falling, loss."""

    def __init__(self, vocab_size: int, width: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.out = torch.nn.Linear(width, vocab_size)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.embed(tokens))
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [b, s]


def train(manifest_path: str, steps: int = 30, seq_length: int = 64, micro_batch_size: int = 4,
          global_batch_size: int = 8, seed: int = 1234, cache: Optional[str] = None,
          dp_rank: int = 0, dp_size: int = 1, checkpoint: Optional[str] = None) -> List[dict]:
    """Train TinyLM with online data mixing; returns the mixer's update records (mixture.jsonl lines)."""
    manifest = Manifest.load(manifest_path)
    names, prefixes = manifest.domain_names, manifest.prefixes
    tokenizer = TokenizerSpec(vocab_size=manifest.tokenizer.vocab_size, eod=manifest.tokenizer.eod_id)

    # 1. one megatron-core GPTDataset per domain (one epoch each), behind one online dataset
    config = make_gpt_dataset_config(seed=seed, seq_length=seq_length, tokenizer=tokenizer, path_to_cache=cache)
    domains = build_domain_datasets(prefixes, config, domain_names=names)
    dataset = OnlineBlendedDataset(domains, seed=seed, domain_names=names)

    # 2. the bandit: the same settings and defaults as `odm-megatron train --odm-*` (policy odm-exp3)
    odm = OdmConfig(prior="natural", update_interval=1, lag=2)
    prior = odm.resolve_prior(names, [d.tokens for d in manifest.domains])  # natural: tokens per domain
    mixer = OnlineMixer(odm.mixer_config(names, seed=seed, global_batch_size=global_batch_size), prior=prior,
                        num_samples_per_domain=dataset.num_samples_per_domain, device=torch.device("cpu"))

    # 3. the sampler decides which domain sample each global sample is (the same on every rank)
    sampler = OnlineMixingBatchSampler(mixer, total_samples=steps * global_batch_size, consumed_samples=0,
                                       micro_batch_size=micro_batch_size, data_parallel_rank=dp_rank,
                                       data_parallel_size=dp_size)
    # A private generator: otherwise a DataLoader iterator draws its base seed from the global torch
    # RNG, and a resumed run (which restores RNG states first) would drift by one draw.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0,
                                         generator=torch.Generator().manual_seed(seed))
    micro_batches = global_batch_size // (micro_batch_size * dp_size)

    torch.manual_seed(seed)
    model = TinyLM(tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = iter(loader)
    records = []
    for step in range(steps):
        for _ in range(micro_batches):
            batch = next(batches)  # tokens, labels, loss_mask, ..., dataset_id (the domain of each sample)
            per_token_loss = model(batch["tokens"], batch["labels"])
            mixer.accumulate(per_token_loss.detach(), batch["loss_mask"], batch["dataset_id"])
            mask = batch["loss_mask"].float()
            ((per_token_loss * mask).sum() / mask.sum() / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = mixer.step_end(step)  # every rank, every step; a policy update every update_interval steps
        if record is not None:
            records.append(record.to_json(names))
    if checkpoint is not None:  # mixer.state_dict() is collective under torchrun: call it on every rank
        torch.save({"model": model.state_dict(), "bandit": mixer.state_dict(), "step": steps}, checkpoint)
    return records


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", help="manifest.json from `odm-megatron preprocess` (default: a tiny corpus)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--workdir", help="where the tiny corpus and index caches go (default: a temp dir)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        manifest = args.manifest or make_tiny_corpus(workdir)
        records = train(manifest, steps=args.steps, cache=os.path.join(workdir, "index_cache"),
                        checkpoint=os.path.join(workdir, "checkpoint.pt"))
    print(f"{len(records)} policy updates over {args.steps} steps")
    print(f"{'domain':<16} {'first loss':>10} {'last loss':>10} {'weight':>8}   (mean token loss of the update windows)")
    for name in records[-1]["weights"]:
        seen = [r["loss"][name] for r in records if r["loss"][name] is not None]  # None: not sampled in a window
        print(f"{name:<16} {seen[0]:10.3f} {seen[-1]:10.3f} {records[-1]['weights'][name]:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
