"""The data description that ``odm-megatron preprocess`` writes and ``odm-megatron train`` reads.

``DIR/manifest.json`` names, for each domain, its Megatron indexed-dataset prefix (relative to
the manifest's directory) and its size, plus the tokenizer the shards were made with. The
natural prior (weights proportional to tokens, as The Pile's sampling roughly is) comes from it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

MANIFEST_FORMAT = "odm-megatron-manifest"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent."""


@dataclass
class DomainEntry:
    name: str
    prefix: str  # absolute path prefix of <prefix>.bin / <prefix>.idx
    documents: int
    tokens: int


@dataclass
class TokenizerEntry:
    path: str
    type: str  # "sentencepiece" | "huggingface"
    vocab_size: int
    eod_id: int
    sha256: Optional[str] = None


@dataclass
class Manifest:
    path: str
    domains: List[DomainEntry]
    tokenizer: TokenizerEntry
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def domain_names(self) -> List[str]:
        return [d.name for d in self.domains]

    @property
    def prefixes(self) -> List[str]:
        return [d.prefix for d in self.domains]

    def natural_prior(self) -> np.ndarray:
        """Weights proportional to each domain's token count."""
        tokens = np.array([d.tokens for d in self.domains], dtype=np.float64)
        if tokens.sum() <= 0:
            raise ManifestError(f"{self.path}: every domain has zero tokens")
        return tokens / tokens.sum()

    @classmethod
    def load(cls, path: str) -> "Manifest":
        if os.path.isdir(path):
            path = os.path.join(path, "manifest.json")
        if not os.path.isfile(path):
            raise ManifestError(f"manifest not found: {path} (make one with `odm-megatron preprocess`)")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        if raw.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{path}: not an odm-megatron manifest (format={raw.get('format')!r})")
        if raw.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{path}: manifest version {raw.get('version')!r}, this odm-megatron reads {MANIFEST_VERSION}"
            )
        base = os.path.dirname(os.path.abspath(path))
        try:
            domains = [
                DomainEntry(
                    name=str(d["name"]),
                    prefix=os.path.normpath(os.path.join(base, d["prefix"])),
                    documents=int(d["documents"]),
                    tokens=int(d["tokens"]),
                )
                for d in raw["domains"]
            ]
            t = raw["tokenizer"]
            tok_path = t["path"] if os.path.isabs(t["path"]) else os.path.normpath(os.path.join(base, t["path"]))
            tokenizer = TokenizerEntry(
                path=tok_path,
                type=str(t.get("type", "sentencepiece")),
                vocab_size=int(t["vocab_size"]),
                eod_id=int(t["eod_id"]),
                sha256=t.get("sha256"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
        if not domains:
            raise ManifestError(f"{path}: lists no domains")
        names = [d.name for d in domains]
        if len(set(names)) != len(names):
            raise ManifestError(f"{path}: duplicate domain names {sorted(n for n in set(names) if names.count(n) > 1)}")
        return cls(path=path, domains=domains, tokenizer=tokenizer, raw=raw)
