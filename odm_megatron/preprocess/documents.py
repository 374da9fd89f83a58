"""Raw jsonl lines -> (line, domain, text), with every rejected line given a reason.

Runs inside the worker processes, so it is written for speed: one ``split``, one strict
UTF-8 decode and one ``json.loads`` per line; the surrogate check only for non-ASCII text.
"""
from __future__ import annotations

import json
from typing import List, Tuple

from odm_megatron.preprocess.domains import DomainKey

# (line number, reason, detail)
Skip = Tuple[int, str, str]
# (line number, domain, text)
Document = Tuple[int, str, str]


def parse_lines(data: bytes, first_line: int, domain_key: DomainKey) -> Tuple[List[Document], List[Skip]]:
    """Parse whole jsonl lines; lines that are not usable documents are returned as skips."""
    docs: List[Document] = []
    skips: List[Skip] = []
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the text after the final newline
    loads = json.loads
    lookup = domain_key.lookup
    for number, line in enumerate(lines, first_line):
        if not line or line.isspace():
            skips.append((number, "blank_line", ""))
            continue
        try:
            obj = loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            skips.append((number, "invalid_utf8", f"byte {e.start}: {e.reason}"))
            continue
        except ValueError as e:  # json.JSONDecodeError, or a number too large to convert
            skips.append((number, "invalid_json", str(e)[:120]))
            continue
        except RecursionError:  # e.g. 100,000 '[': json's C parser gives up at the recursion limit
            skips.append((number, "too_deeply_nested", f"{len(line):,} bytes"))
            continue
        if not isinstance(obj, dict):
            skips.append((number, "not_an_object", type(obj).__name__))
            continue
        domain = lookup(obj)
        if domain is None:
            skips.append((number, "missing_domain", domain_key.dotted))
            continue
        if not isinstance(domain, str) or not domain or not (domain.isascii() or _encodable(domain)):
            skips.append((number, "invalid_domain", f"{domain_key.dotted}={domain!r}"[:120]))
            continue
        if "text" not in obj:
            skips.append((number, "missing_text", ""))
            continue
        text = obj["text"]
        if not isinstance(text, str):
            skips.append((number, "non_string_text", type(text).__name__))
            continue
        if not text:
            skips.append((number, "empty_text", ""))
            continue
        if not text.isascii() and not _encodable(text):
            skips.append((number, "invalid_utf8", "lone surrogate escape in text"))
            continue
        docs.append((number, domain, text))
    return docs, skips


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
