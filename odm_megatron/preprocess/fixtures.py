"""Small synthetic corpora in The Pile's format, for tests and examples (no downloads).

Each domain draws from its own word list, so a tokenizer trained on the mix has to learn all
of them; a little non-ASCII text (accents, CJK, emoji) exercises byte fallback.
"""
from __future__ import annotations

import gzip
import json
import random
from typing import Dict, Iterable, List, Optional

# The Pile's own names (with spaces and parentheses) plus a deliberately small domain.
DOMAIN_WORDS: Dict[str, List[str]] = {
    "Pile-CC": "the of and to in is that for on with as was it by at from this be are or an have".split(),
    "Wikipedia (en)": "history born city river university population century war county species album".split(),
    "DM Mathematics": "solve let calculate derivative prime factor remainder divided sum product 17 42 3".split(),
    "Github": "def return import class self if else for in while None True False print ( ) : = +".split(),
    "Enron Emails": "meeting forward please regards thanks attached schedule call gas power deal".split(),
}
EXTRA_TEXT = ["café", "naïve", "東京", "数学", "🙂", "Übung", "façade"]


def make_documents(
    docs_per_domain: Optional[Dict[str, int]] = None,
    words_per_doc: int = 60,
    seed: int = 0,
) -> List[dict]:
    """Pile-format records, domains interleaved at random (as in the real files)."""
    rng = random.Random(seed)
    if docs_per_domain is None:
        docs_per_domain = {"Pile-CC": 40, "Wikipedia (en)": 30, "DM Mathematics": 20, "Github": 20, "Enron Emails": 5}
    order = [d for d, n in docs_per_domain.items() for _ in range(n)]
    rng.shuffle(order)
    records = []
    for domain in order:
        words = DOMAIN_WORDS.get(domain) or DOMAIN_WORDS["Pile-CC"]
        n = max(1, int(rng.gauss(words_per_doc, words_per_doc / 3)))
        tokens = [rng.choice(words) for _ in range(n)]
        if rng.random() < 0.3:
            tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(EXTRA_TEXT))
        lines = [" ".join(tokens[i:i + 12]) for i in range(0, len(tokens), 12)]
        text = "\n".join(lines)
        if domain == "Github":
            text = text.replace(" : ", ":\n    ")
        records.append({"text": text, "meta": {"pile_set_name": domain, "source": f"src-{len(domain) % 3}"}})
    return records


def jsonl_bytes(lines: Iterable) -> bytes:
    """Records (dicts) or raw lines (str/bytes, written as they are) -> jsonl bytes."""
    out = bytearray()
    for item in lines:
        if isinstance(item, bytes):
            out += item
        elif isinstance(item, str):
            out += item.encode("utf-8", "surrogatepass")
        else:
            out += json.dumps(item, ensure_ascii=False).encode("utf-8")
        out += b"\n"
    return bytes(out)


def write_corpus(path: str, lines: Iterable, frames: int = 1) -> str:
    """Write ``.jsonl``, ``.jsonl.gz`` or ``.jsonl.zst`` (in ``frames`` zstd frames) by the suffix."""
    data = jsonl_bytes(lines)
    if path.endswith(".zst"):
        import zstandard

        cctx = zstandard.ZstdCompressor(level=3)
        # Frames split at line ends, as `zstd` of concatenated files or streaming writers produce.
        parts: List[bytes] = []
        if frames > 1:
            cuts = sorted({data.find(b"\n", len(data) * k // frames) + 1 for k in range(1, frames)} - {0})
            starts = [0] + cuts
            parts = [data[a:b] for a, b in zip(starts, cuts + [len(data)])]
        else:
            parts = [data]
        blob = b"".join(cctx.compress(p) for p in parts if p)
    elif path.endswith(".gz"):
        blob = gzip.compress(data, mtime=0)
    else:
        blob = data
    with open(path, "wb") as f:
        f.write(blob)
    return path
