"""The record of lines that did not become documents: nothing is dropped silently.

Every skipped line is counted under one reason, and the first few of each reason are kept as
``[file, line]`` so a user can look at them. The same record goes into the manifest and into
the summary printed at the end of a run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

# reason -> what it means (the order used in summaries)
REASONS: Dict[str, str] = {
    "blank_line": "empty or whitespace-only line",
    "invalid_utf8": "line (or its text) is not valid UTF-8",
    "invalid_json": "line is not valid JSON",
    "too_deeply_nested": "JSON nested too deeply to parse",
    "not_an_object": "JSON value is not an object",
    "missing_domain": "the domain key is absent or null",
    "invalid_domain": "the domain value is not a non-empty string",
    "missing_text": "no \"text\" field",
    "non_string_text": "\"text\" is not a string",
    "empty_text": "\"text\" is the empty string",
    "no_tokens": "the tokenizer produced no tokens",
    "truncated_stream": "compressed stream ends early; the rest of the file is lost",
    "corrupt_stream": "compressed stream is corrupt; the rest of the file is lost",
}


class StrictModeError(ValueError):
    """``--strict``: the first bad line is an error."""


@dataclass
class SkipRecord:
    """Counts of skipped lines by reason, with the first ``keep_first`` locations of each."""

    keep_first: int = 5
    counts: Dict[str, int] = field(default_factory=dict)
    first: Dict[str, List[Tuple[str, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keep_first < 0:
            raise ValueError("keep_first must be >= 0")

    def add(self, reason: str, file: str, line: int) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        where = self.first.setdefault(reason, [])
        if len(where) < self.keep_first:
            where.append((file, int(line)))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _ordered(self) -> List[str]:
        return [r for r in REASONS if r in self.counts]

    def to_json(self) -> Dict[str, dict]:
        return {
            r: {"count": self.counts[r], "description": REASONS[r], "first": [[f, n] for f, n in self.first[r]]}
            for r in self._ordered()
        }

    def summary_lines(self) -> List[str]:
        lines = []
        for r in self._ordered():
            where = ", ".join(f"{f}:{n}" for f, n in self.first[r])
            more = ", ..." if self.counts[r] > len(self.first[r]) else ""
            lines.append(f"{r}: {self.counts[r]} ({REASONS[r]}) at {where}{more}")
        return lines
