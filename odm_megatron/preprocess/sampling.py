"""A text sample for tokenizer training, drawn evenly across domains in one streaming pass.

Drawing a fixed byte budget at random from the whole corpus lets big domains crowd out small
ones (The Pile: Pile-CC vs. Enron Emails), and the tokenizer then splits the small domains'
words badly. Instead the budget is *water-filled*: every domain gets the same share, and a
domain smaller than its share is taken whole, its unused share going to the others.

In one pass, without knowing domain sizes in advance: each piece of text gets a random key and
each domain keeps the pieces with the smallest keys, up to the current water level. The level
only falls as more text is seen, so a piece dropped once would never be chosen later; memory
stays near the budget.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

UNIT_BYTES = 4096  # texts are sampled in pieces of about this size, cut at line ends


def water_level(sizes: List[int], budget: int) -> float:
    """The per-domain cap L with sum(min(size, L)) == budget (infinite if all fits)."""
    if sum(sizes) <= budget:
        return float("inf")
    remaining, left = budget, len(sizes)
    for size in sorted(sizes):
        share = remaining / left
        if size >= share:
            return share
        remaining -= size
        left -= 1
    return float(remaining)  # unreachable: the sum exceeds the budget


def split_units(text: str, unit_bytes: int = UNIT_BYTES) -> Iterator[str]:
    """Pieces of about ``unit_bytes`` characters, cut after a newline when there is one."""
    start, n = 0, len(text)
    while start < n:
        end = start + unit_bytes
        if end < n:
            cut = text.rfind("\n", start, end)
            if cut > start:
                end = cut + 1
        yield text[start:end]
        start = end


@dataclass
class BalancedSampler:
    """Keep about ``budget_bytes`` of UTF-8 text, water-filled across domains."""

    budget_bytes: int
    seed: int = 0
    unit_bytes: int = UNIT_BYTES
    seen: Dict[str, int] = field(default_factory=dict)  # bytes offered, per domain
    kept: Dict[str, int] = field(default_factory=dict)  # bytes kept, per domain
    _heaps: Dict[str, List[Tuple[float, int, int, str]]] = field(default_factory=dict, repr=False)
    _kept_total: int = field(default=0, repr=False)
    _counter: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if self.unit_bytes <= 0:
            raise ValueError("unit_bytes must be positive")
        self._rng = random.Random(self.seed)

    def add(self, domain: str, text: str) -> None:
        heap = self._heaps.setdefault(domain, [])
        for unit in split_units(text, self.unit_bytes):
            size = len(unit.encode("utf-8", "surrogatepass"))
            self._counter += 1
            heapq.heappush(heap, (-self._rng.random(), self._counter, size, unit))  # max-heap on key
            self.seen[domain] = self.seen.get(domain, 0) + size
            self.kept[domain] = self.kept.get(domain, 0) + size
            self._kept_total += size
        if self._kept_total > self.budget_bytes * 1.25 + self.unit_bytes:
            self._shrink()

    def _shrink(self) -> None:
        level = water_level(list(self.seen.values()), self.budget_bytes)
        for domain, heap in self._heaps.items():
            while self.kept[domain] > level and heap:
                size = heapq.heappop(heap)[2]  # the largest key goes first
                self.kept[domain] -= size
                self._kept_total -= size

    def sample(self) -> Dict[str, List[str]]:
        """Domain -> kept pieces, in key order (random, reproducible for a seed); sorted by domain."""
        self._shrink()
        return {d: [e[3] for e in sorted(self._heaps[d], key=lambda e: (-e[0], e[1]))]
                for d in sorted(self._heaps)}
