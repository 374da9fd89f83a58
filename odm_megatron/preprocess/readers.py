"""Stream whole lines out of ``.jsonl``, ``.jsonl.zst`` (multi-frame too) and ``.jsonl.gz``.

The reader never holds more than about one chunk of a file: it hands out ``Chunk``s of whole
lines (~``chunk_bytes`` each, numbered from 1) that worker processes parse and tokenize.
Splitting into lines and parsing are left to the workers so that the one serial process does
as little as possible.

A stream that ends early is reported, not swallowed: ``zstandard``'s own stream reader returns
a truncated file's data without complaint, so frames are decoded here with ``decompressobj`` and
the end of the input is checked to fall on a frame boundary. The partial last line of a
truncated stream is dropped and reported as a :class:`StreamProblem` at its line number.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Tuple, Union

TRUNCATED_STREAM = "truncated_stream"
CORRUPT_STREAM = "corrupt_stream"

_READ_BYTES = 1 << 18  # compressed bytes per read
_ZSTD_SUFFIXES = (".zst", ".zstd")
_GZIP_SUFFIXES = (".gz", ".gzip")
_UNSUPPORTED_SUFFIXES = (".xz", ".bz2", ".lz4", ".zip", ".7z", ".tar")


class InputError(ValueError):
    """An input that cannot be read at all (missing, a directory, unsupported compression)."""


@dataclass(frozen=True)
class Chunk:
    """Whole lines of one file: ``data`` holds lines ``first_line`` .. ``first_line + num_lines - 1``."""

    file_index: int
    first_line: int
    num_lines: int
    data: bytes
    raw_position: int  # compressed bytes of the file consumed so far (progress)


@dataclass(frozen=True)
class StreamProblem:
    """The file's stream ended early or is corrupt from ``line`` on; the rest of it is lost."""

    file_index: int
    line: int
    reason: str
    detail: str
    raw_position: int


class _StreamError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def compression_of(path: str) -> str:
    """``"zstd"``, ``"gzip"`` or ``"none"``, from the file name."""
    lower = path.lower()
    if lower.endswith(_ZSTD_SUFFIXES):
        return "zstd"
    if lower.endswith(_GZIP_SUFFIXES):
        return "gzip"
    if lower.endswith(_UNSUPPORTED_SUFFIXES):
        raise InputError(f"{path}: unsupported compression (use .jsonl, .jsonl.zst or .jsonl.gz)")
    return "none"


def check_input(path: str) -> int:
    """Fail early with a one-line reason; returns the file size."""
    if not os.path.exists(path):
        raise InputError(f"input not found: {path}")
    if not os.path.isfile(path):
        raise InputError(f"input is not a file: {path}")
    compression_of(path)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise InputError(f"cannot read input {path}: {e.strerror or e}") from None
    return os.path.getsize(path)


def iter_chunks(
    path: str, file_index: int = 0, chunk_bytes: int = 1 << 20
) -> Iterator[Union[Chunk, StreamProblem]]:
    """Chunks of whole lines in file order, then at most one :class:`StreamProblem`."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    next_line = 1
    pending = bytearray()
    with open(path, "rb") as raw:
        blocks = _decompressed_blocks(raw, compression_of(path))
        problem: Optional[Tuple[str, str]] = None
        while True:
            try:
                block = next(blocks, None)
            except _StreamError as e:
                problem = (e.reason, e.detail)
                break
            if block is None:
                break
            pending += block
            start = 0
            while len(pending) - start >= chunk_bytes:
                # whole lines, about chunk_bytes of them (one longer line is kept whole)
                cut = pending.rfind(b"\n", start, start + chunk_bytes) + 1 or pending.find(b"\n", start) + 1
                if not cut:
                    break
                data = bytes(pending[start:cut])
                count = data.count(b"\n")
                yield Chunk(file_index, next_line, count, data, raw.tell())
                next_line += count
                start = cut
            del pending[:start]
        position = raw.tell()
    if problem is None:
        if pending:  # the rest, perhaps with a last line that has no newline
            count = pending.count(b"\n") + (not pending.endswith(b"\n"))
            yield Chunk(file_index, next_line, count, bytes(pending), position)
        return
    # Whole lines before the break are fine; a partial last line is part of the damage.
    cut = pending.rfind(b"\n") + 1
    if cut:
        data = bytes(pending[:cut])
        count = data.count(b"\n")
        yield Chunk(file_index, next_line, count, data, position)
        next_line += count
    reason, detail = problem
    yield StreamProblem(file_index, next_line, reason, detail, position)


def _decompressed_blocks(raw: BinaryIO, compression: str) -> Iterator[bytes]:
    if compression == "zstd":
        return _zstd_blocks(raw)
    if compression == "gzip":
        return _gzip_blocks(raw)
    return iter(lambda: raw.read(_READ_BYTES), b"")


def _zstd_blocks(raw: BinaryIO) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj = dctx.decompressobj()
    in_frame = False  # bytes of the current frame have been fed
    while True:
        data = raw.read(_READ_BYTES)
        if not data:
            break
        while data:
            try:
                out = obj.decompress(data)
            except zstandard.ZstdError as e:
                raise _StreamError(CORRUPT_STREAM, f"zstd: {e}") from None
            in_frame = True
            if out:
                yield out
            if not obj.eof:
                break
            data = obj.unused_data  # the next frame starts here
            obj = dctx.decompressobj()
            in_frame = False
    if in_frame:
        raise _StreamError(TRUNCATED_STREAM, "zstd stream ends inside a frame (file truncated?)")


def _gzip_blocks(raw: BinaryIO) -> Iterator[bytes]:
    """Members decoded incrementally (as for zstd), so that a truncated file yields everything
    before the break, and the end of the input is checked to fall on a member boundary."""
    obj = zlib.decompressobj(wbits=31)
    in_member = False
    while True:
        data = raw.read(_READ_BYTES)
        if not data:
            break
        while data:
            if not in_member and not data.strip(b"\x00"):
                data = b""  # zero padding after the last member (tar-like writers), as gzip allows
                break
            try:
                out = obj.decompress(data)
            except zlib.error as e:
                raise _StreamError(CORRUPT_STREAM, f"gzip: {e}") from None
            in_member = True
            if out:
                yield out
            if not obj.eof:
                break
            data = obj.unused_data  # the next member starts here
            obj = zlib.decompressobj(wbits=31)
            in_member = False
    if in_member:
        raise _StreamError(TRUNCATED_STREAM, "gzip stream ends early (file truncated?)")
