"""``odm-megatron train-tokenizer``: a SentencePiece model from a sample drawn across domains.

The inputs are read once (same readers and bad-line accounting as ``preprocess``); a
domain-balanced sample (see :mod:`~odm_megatron.preprocess.sampling`) is written one line per
sentence and handed to SentencePiece with byte fallback on and ``</s>`` as end-of-document.
Besides ``PREFIX.model`` / ``PREFIX.vocab``, ``PREFIX.json`` records what the sample held.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Dict, List

from odm_megatron.preprocess.documents import parse_lines
from odm_megatron.preprocess.domains import DomainKey
from odm_megatron.preprocess.pipeline import DEFAULT_DOMAIN_KEY
from odm_megatron.preprocess.readers import InputError, StreamProblem, check_input, iter_chunks
from odm_megatron.preprocess.sampling import BalancedSampler
from odm_megatron.preprocess.skips import SkipRecord
from odm_megatron.tokenizer import (
    SentencePieceTrainingConfig,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

logger = logging.getLogger(__name__)

_MAX_LINE_CHARS = 4096  # <= SentencePiece's max_sentence_length in bytes, whatever the script


def parse_size(text: str) -> int:
    """``100M``, ``1.5G``, ``250000`` -> bytes (K/M/G are powers of 1000)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgG]?)[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 50M, 2G, 1000000)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="Pile-format inputs (.jsonl, .jsonl.zst, .jsonl.gz), read once as a stream")
    parser.add_argument("--vocab-size", type=int, required=True, metavar="V",
                        help="vocabulary size including <unk>, <s>, </s> and the 256 byte-fallback pieces")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe",
                        help="SentencePiece algorithm")
    parser.add_argument("--output", required=True, metavar="PREFIX",
                        help="writes PREFIX.model, PREFIX.vocab and PREFIX.json (what the sample held)")
    # A string default: argparse parses it with `type` (100000000 bytes) and --help shows "100M".
    parser.add_argument("--sample-bytes", type=parse_size, default="100M", metavar="N",
                        help="text to train on (e.g. 50M, 2G): split evenly across domains, a domain smaller "
                             "than its share is taken whole and the rest goes to the others")
    parser.add_argument("--domain-key", default=DEFAULT_DOMAIN_KEY, metavar="DOTTED.KEY",
                        help="dotted path of each document's domain name, e.g. meta.pile_set_name or meta.source")
    parser.add_argument("--character-coverage", type=float, default=0.9999,
                        help="share of characters given their own piece; rarer ones fall back to UTF-8 bytes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (and of SentencePiece's shuffling)")
    parser.add_argument("--threads", type=int, default=0, help="SentencePiece training threads (0: all CPUs)")
    parser.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")


def main(args: argparse.Namespace) -> int:
    try:
        model = train_tokenizer(args)
    except (InputError, TokenizerError, ValueError) as e:
        print(f"odm-megatron train-tokenizer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("odm-megatron train-tokenizer: interrupted; no model written", file=sys.stderr)
        return 130
    tok = load_tokenizer(model)
    print(f"train-tokenizer: wrote {model} (vocab {tok.vocab_size}, eod id {tok.eod} {tok.piece(tok.eod)!r}, "
          f"sha256 {tok.sha256[:12]}...)")
    return 0


def train_tokenizer(args: argparse.Namespace) -> str:
    """Sample, write sentences, train; returns the model path."""
    config = SentencePieceTrainingConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, character_coverage=args.character_coverage,
        num_threads=args.threads, seed=args.seed, verbose=args.verbose,
    )
    key = DomainKey(args.domain_key)
    sizes = {os.path.abspath(p): check_input(p) for p in args.input}
    started = time.perf_counter()
    sampler = BalancedSampler(args.sample_bytes, seed=args.seed)
    skipped = SkipRecord()
    documents = 0
    for index, path in enumerate(sizes):
        for item in iter_chunks(path, index):
            if isinstance(item, StreamProblem):
                skipped.add(item.reason, path, item.line)
                continue
            docs, skips = parse_lines(item.data, item.first_line, key)
            for line, reason, _ in skips:
                skipped.add(reason, path, line)
            for _, domain, text in docs:
                sampler.add(domain, text)
            documents += len(docs)
    if not documents:
        raise TokenizerError(f"no documents in the input ({'; '.join(skipped.summary_lines()) or 'all empty'})")
    sample = sampler.sample()
    logger.info("read %d documents in %.1f s; sample per domain (MB): %s", documents,
                time.perf_counter() - started,
                ", ".join(f"{d} {sampler.kept[d] / 1e6:.2f}/{sampler.seen[d] / 1e6:.2f}" for d in sample))
    for line in skipped.summary_lines():
        logger.warning("skipped %s", line)

    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out_dir, prefix=".sample-", suffix=".txt",
                                     delete=False) as f:
        sentences = _write_sentences(f, sample)
    try:
        if not sentences:
            raise TokenizerError("the sample holds no text")
        model = train_sentencepiece(f.name, args.output, config)
    finally:
        os.remove(f.name)
    record = {
        "model": os.path.abspath(model),
        "vocab_size": args.vocab_size,
        "model_type": args.model_type,
        "eod_piece": "</s>",
        "domain_key": args.domain_key,
        "sample_bytes": args.sample_bytes,
        "seed": args.seed,
        "sentences": sentences,
        "domains": {d: {"seen_bytes": sampler.seen[d], "sampled_bytes": sampler.kept[d]} for d in sample},
        "inputs": [{"path": p, "size": s} for p, s in sizes.items()],
        "skipped": skipped.to_json(),
    }
    with open(args.output + ".json", "w", encoding="utf-8") as jf:
        json.dump(record, jf, indent=1)
    return model


def _write_sentences(f, sample: Dict[str, List[str]]) -> int:
    count = 0
    for units in sample.values():
        for unit in units:
            for line in unit.split("\n"):
                if not line.strip():
                    continue
                for start in range(0, len(line), _MAX_LINE_CHARS):
                    f.write(line[start:start + _MAX_LINE_CHARS])
                    f.write("\n")
                    count += 1
    return count
