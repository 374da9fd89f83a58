"""Pile-format jsonl in, per-domain indexed datasets and a manifest out, in input order.

The main process reads and decompresses (cheap), hands chunks of whole lines to workers that
parse and tokenize them (the real cost), and writes the results back in submission order, so
the shards are byte-identical for any number of workers. At most ``2 * workers + 2`` chunks are
in flight: memory stays bounded however large the input. With one worker everything runs in the
main process, with no process pool and no pickling.
"""
from __future__ import annotations

import collections
import logging
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from odm_megatron.preprocess.domains import DomainError, DomainKey
from odm_megatron.preprocess.readers import Chunk, InputError, StreamProblem, check_input, iter_chunks
from odm_megatron.preprocess.skips import REASONS, SkipRecord, StrictModeError
from odm_megatron.preprocess.worker import (
    ChunkProcessor,
    ChunkResult,
    WorkerConfig,
    init_worker,
    ping,
    process_chunk,
)
from odm_megatron.preprocess.writer import OutputDirError, ShardWriter, prepare_output_dir, raise_open_file_limit, shard_dtype
from odm_megatron.tokenizer import TokenizerError, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_DOMAIN_KEY = "meta.pile_set_name"


class PreprocessError(ValueError):
    """A run that cannot start or finish; the message is one line for the user."""


# Errors that reach the user as one line (exit code 2 from the CLI).
USER_ERRORS = (PreprocessError, InputError, TokenizerError, DomainError, StrictModeError, OutputDirError)


@dataclass
class PreprocessConfig:
    """What ``odm-megatron preprocess`` does; validated before any file is touched."""

    inputs: List[str]
    tokenizer_model: str
    output_dir: str
    workers: int = 1
    domain_key: str = DEFAULT_DOMAIN_KEY
    append_eod: bool = False
    strict: bool = False
    overwrite: bool = False
    allow_truncated_input: bool = False  # keep what a truncated/corrupt compressed input gave, with a warning
    chunk_bytes: int = 1 << 20
    progress: Optional[bool] = None  # None: a bar only when stderr is a terminal
    start_method: Optional[str] = None  # None: fork where available, else spawn

    def __post_init__(self) -> None:
        if not self.inputs:
            raise PreprocessError("no input files given")
        if self.workers < 1:
            raise PreprocessError(f"--workers must be >= 1, not {self.workers}")
        if self.chunk_bytes < 1:
            raise PreprocessError("chunk_bytes must be positive")
        try:
            DomainKey(self.domain_key)
        except ValueError as e:
            raise PreprocessError(str(e)) from None
        seen = set()
        for path in self.inputs:
            real = os.path.realpath(path)
            if real in seen:
                raise PreprocessError(f"input given twice: {path}")
            seen.add(real)


@dataclass
class InputStats:
    path: str
    size: int
    lines: int = 0
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0  # decompressed bytes handed on


@dataclass
class PreprocessResult:
    manifest_path: str
    manifest: Dict[str, Any]
    skipped: SkipRecord
    seconds: float
    input_bytes: int  # decompressed jsonl bytes read
    inputs: List[InputStats] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return int(self.manifest["totals"]["documents"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["totals"]["tokens"])


def run_preprocess(config: PreprocessConfig) -> PreprocessResult:
    """Tokenize ``config.inputs`` into ``config.output_dir``; see the module docstring."""
    started = time.perf_counter()
    inputs = [InputStats(os.path.abspath(p), check_input(p)) for p in config.inputs]
    tokenizer = load_tokenizer(config.tokenizer_model)
    prepare_output_dir(config.output_dir, config.overwrite)
    # Workers start before megatron-core (and torch) are imported (by shard_dtype): they need neither.
    pool = _start_pool(config, tokenizer) if config.workers > 1 else None
    finished = False
    try:
        from odm_megatron.preprocess.manifest_writer import build_manifest, write_manifest

        dtype = shard_dtype(tokenizer.vocab_size)
        worker_config = WorkerConfig(tokenizer.path, config.domain_key, config.append_eod, dtype.name)
        raise_open_file_limit()  # one open shard per domain
        writer = ShardWriter(config.output_dir, dtype)
        skipped = SkipRecord()
        progress = _Progress(sum(i.size for i in inputs), config.progress)
        try:
            jobs = _jobs(inputs, config.chunk_bytes)
            if pool is None:
                results = _in_process(jobs, ChunkProcessor(worker_config, tokenizer))
            else:
                results = _ordered_pool(jobs, pool, 2 * config.workers + 2)
            input_bytes = 0
            for item in results:
                if isinstance(item, StreamProblem):
                    stats = inputs[item.file_index]
                    _stream_problem(config, stats, item)
                    _skip(config, skipped, stats.path, item.line, item.reason, item.detail)
                    progress.update(stats, item.raw_position, 0, 0, 0)
                    continue
                chunk, result = item
                stats = inputs[chunk.file_index]
                for line, reason, detail in result.skips:
                    _skip(config, skipped, stats.path, line, reason, detail)
                writer.add_documents(result.domains, result.offsets, result.tokens)
                stats.lines += chunk.num_lines
                stats.documents += len(result.domains)
                stats.tokens += len(result.tokens)
                stats.text_bytes += len(chunk.data)
                input_bytes += len(chunk.data)
                progress.update(stats, chunk.raw_position, len(result.domains), len(result.tokens), len(chunk.data))
            if not writer.stats:
                raise PreprocessError(
                    f"no documents found in {len(inputs)} input file(s) "
                    f"({skipped.total} lines skipped: {'; '.join(skipped.summary_lines()) or 'all empty'})"
                )
            domains = writer.commit()
        except BaseException:
            writer.abort()
            raise
        finally:
            progress.close()
        manifest = build_manifest(
            domains,
            tokenizer.describe(),
            [{"path": i.path, "size": i.size, "lines": i.lines, "documents": i.documents, "tokens": i.tokens}
             for i in inputs],
            skipped,
            {"domain_key": config.domain_key, "append_eod": config.append_eod, "dtype": dtype.name},
        )
        try:
            path = write_manifest(config.output_dir, manifest)
        except BaseException:
            writer.remove_committed()  # shards without a manifest must not look like a finished run
            raise
        finished = True
    finally:
        if pool is not None:
            _stop_pool(pool, finished)
    seconds = time.perf_counter() - started
    logger.info("wrote %d domains, %d documents, %d tokens to %s in %.1f s", len(domains),
                manifest["totals"]["documents"], manifest["totals"]["tokens"], path, seconds)
    return PreprocessResult(path, manifest, skipped, seconds, input_bytes, inputs)


def _stream_problem(config: PreprocessConfig, stats: InputStats, problem: StreamProblem) -> None:
    """A truncated or corrupt compressed input: an error unless --allow-truncated-input (a
    truncated download of a tens-of-GB file must not pass as a complete corpus)."""
    where = (f"{problem.detail}: stopped at line {problem.line:,} after {problem.line - 1:,} complete lines "
             f"({stats.text_bytes:,} bytes decompressed from {problem.raw_position:,} of the file's "
             f"{stats.size:,} bytes)")
    if config.strict:
        return  # --strict reports it as the bad line it is
    if not config.allow_truncated_input:
        raise InputError(f"{stats.path}: {where}; re-download or repair the file, or pass "
                         f"--allow-truncated-input to keep the lines read so far")
    logger.warning("%s: %s; keeping the lines read so far (--allow-truncated-input)", stats.path, where)


def _skip(config: PreprocessConfig, skipped: SkipRecord, path: str, line: int, reason: str, detail: str) -> None:
    if config.strict:
        extra = f": {detail}" if detail else ""
        raise StrictModeError(f"{path}:{line}: {REASONS[reason]} [{reason}]{extra} (--strict)")
    skipped.add(reason, path, line)


Job = Tuple[int, int, int, bytes]
Item = Union[StreamProblem, Tuple[Chunk, ChunkResult]]


def _jobs(inputs: List[InputStats], chunk_bytes: int) -> Iterator[Union[Chunk, StreamProblem]]:
    for index, stats in enumerate(inputs):
        yield from iter_chunks(stats.path, index, chunk_bytes)


def _job(chunk: Chunk) -> Job:
    return (chunk.file_index, chunk.first_line, chunk.num_lines, chunk.data)


def _in_process(items: Iterator[Union[Chunk, StreamProblem]], processor: ChunkProcessor) -> Iterator[Item]:
    for item in items:
        if isinstance(item, StreamProblem):
            yield item
        else:
            yield item, processor(_job(item))


def _ordered_pool(items: Iterator[Union[Chunk, StreamProblem]], pool: Any, max_pending: int) -> Iterator[Item]:
    """Results in submission order, with at most ``max_pending`` chunks submitted and unread.

    (``Pool.imap`` or ``Executor.map`` would read the whole input ahead of the workers.)
    """
    pending: collections.deque = collections.deque()
    for item in items:
        if isinstance(item, StreamProblem):
            pending.append((item, None))
        else:
            pending.append((item, pool.submit(process_chunk, _job(item))))
        while len(pending) >= max_pending or (pending and pending[0][1] is None):
            yield _resolve(pending.popleft())
    while pending:
        yield _resolve(pending.popleft())


def _resolve(entry: Tuple[Any, Any]) -> Item:
    item, future = entry
    if future is None:
        return item
    try:
        return item, future.result()
    except BrokenProcessPool:
        raise PreprocessError("a worker process died (killed for lack of memory?); no shards were kept") from None


def _start_pool(config: PreprocessConfig, tokenizer: Any) -> Any:
    method = config.start_method
    if method is None:
        # fork: workers start in milliseconds and never re-import the caller's __main__ (so a
        # script without a main guard, or stdin, works). The pool is started before torch and
        # megatron-core are imported here, and workers use neither.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    # The shard dtype by megatron-core's rule, without importing it yet; should the rule ever
    # differ, IndexedDatasetBuilder casts to its own dtype, so the shards stay right.
    dtype = "uint16" if tokenizer.vocab_size < 65500 else "int32"
    worker_config = WorkerConfig(tokenizer.path, config.domain_key, config.append_eod, dtype)
    # ProcessPoolExecutor rather than multiprocessing.Pool: a worker that dies (OOM killer)
    # breaks the pool with an error instead of leaving its task waiting forever.
    pool = ProcessPoolExecutor(config.workers, mp_context=ctx, initializer=init_worker, initargs=(worker_config,))
    pool.submit(ping)  # with fork, this starts all workers now, before torch is imported
    return pool


def _stop_pool(pool: ProcessPoolExecutor, finished: bool) -> None:
    if finished:
        pool.shutdown(wait=True)
        return
    # An error or Ctrl-C: drop queued chunks and stop the busy workers now.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


class _Progress:
    """A tqdm bar on stderr (documents/s, tokens/s, MB/s) only when it is a terminal."""

    def __init__(self, total_raw_bytes: int, enabled: Optional[bool]) -> None:
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        self.start = time.perf_counter()
        self.documents = self.tokens = self.text_bytes = 0
        self.done_raw: Dict[str, int] = {}
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_raw_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="preprocess", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, stats: InputStats, raw_position: int, documents: int, tokens: int, text_bytes: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.text_bytes += text_bytes
        if self.bar is None:
            return
        previous = self.done_raw.get(stats.path, 0)
        self.done_raw[stats.path] = raw_position
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tok/s, "
            f"{self.text_bytes / elapsed / 1e6:.1f} MB/s text", refresh=False)
        self.bar.update(raw_position - previous)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
