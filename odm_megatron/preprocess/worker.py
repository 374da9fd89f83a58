"""One unit of parallel work: parse and tokenize a chunk of lines.

Runs in worker processes (or in the main process with one worker), so it imports only
numpy and the tokenizer. A chunk's documents come back as one concatenated token array plus
lengths: a few large buffers pickle far faster than thousands of small lists.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from odm_megatron.preprocess.documents import Skip, parse_lines
from odm_megatron.preprocess.domains import DomainKey
from odm_megatron.tokenizer import Tokenizer, load_tokenizer


@dataclass(frozen=True)
class WorkerConfig:
    tokenizer_path: str
    domain_key: str
    append_eod: bool
    dtype: str  # numpy dtype name of the shards, e.g. "uint16"


@dataclass
class ChunkResult:
    """Documents of one chunk in input order: ``domains[i]`` owns ``tokens[offsets[i]:offsets[i+1]]``."""

    file_index: int
    first_line: int
    num_lines: int
    domains: List[str]
    offsets: np.ndarray  # int64, len(domains) + 1
    tokens: np.ndarray  # the shard dtype
    skips: List[Skip]


class ChunkProcessor:
    """Holds the tokenizer; ``__call__`` turns (file_index, first_line, num_lines, data) into a result."""

    def __init__(self, config: WorkerConfig, tokenizer: Optional[Tokenizer] = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer_path)
        self.key = DomainKey(config.domain_key)
        self.dtype = np.dtype(config.dtype)
        self.eod = self.tokenizer.eod

    def __call__(self, job: Tuple[int, int, int, bytes]) -> ChunkResult:
        file_index, first_line, num_lines, data = job
        docs, skips = parse_lines(data, first_line, self.key)
        texts = [text for _, _, text in docs]
        encoded = self.tokenizer.encode_batch(texts)
        domains: List[str] = []
        pieces: List[np.ndarray] = []
        lengths: List[int] = []
        eod = np.array([self.eod], dtype=np.int32)
        for (number, domain, _), ids in zip(docs, encoded):
            if len(ids) == 0:
                skips.append((number, "no_tokens", ""))
                continue
            domains.append(domain)
            pieces.append(ids)
            if self.config.append_eod:
                pieces.append(eod)
            lengths.append(len(ids) + self.config.append_eod)
        skips.sort()  # no_tokens skips were appended last
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(pieces).astype(self.dtype, copy=False) if pieces else np.zeros(0, self.dtype)
        return ChunkResult(file_index, first_line, num_lines, domains, offsets, tokens, skips)


_PROCESSOR: Optional[ChunkProcessor] = None
_INIT_ERROR: Optional[BaseException] = None


def init_worker(config: WorkerConfig) -> None:
    """Pool initializer: load the tokenizer once per process; Ctrl-C is the parent's to handle.

    A failure is kept and raised by the first task: an initializer that raises makes
    ``multiprocessing.Pool`` restart the worker forever instead of reporting it.
    """
    global _PROCESSOR, _INIT_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _PROCESSOR = ChunkProcessor(config)
    except Exception as e:  # reported by process_chunk, in the parent
        _INIT_ERROR = e


def ping() -> int:
    """A no-op task (starting the pool's processes early)."""
    return os.getpid()


def process_chunk(job: Tuple[int, int, int, bytes]) -> ChunkResult:
    if _PROCESSOR is None:
        raise _INIT_ERROR or RuntimeError("init_worker was not called in this worker process")
    return _PROCESSOR(job)
