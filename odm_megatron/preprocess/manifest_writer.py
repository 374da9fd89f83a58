"""Write ``DIR/manifest.json``: what went in, what came out, what was skipped and why.

The layout is the one :class:`odm_megatron.manifest.Manifest` reads (format, version, domains
with prefixes relative to the manifest, tokenizer); ``inputs``, ``skipped``, ``totals`` and
``options`` are the record for people. Domains are sorted by name and nothing depends on the
number of workers, so two runs over the same input differ only in ``created``.
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Any, Dict, List

from odm_megatron.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, Manifest
from odm_megatron.preprocess.skips import SkipRecord
from odm_megatron.preprocess.writer import MANIFEST_NAME, PARTIAL, DomainStats, output_error


def build_manifest(
    domains: List[DomainStats],
    tokenizer: Dict[str, Any],
    inputs: List[Dict[str, Any]],
    skipped: SkipRecord,
    options: Dict[str, Any],
) -> Dict[str, Any]:
    from odm_megatron import __version__

    ordered = sorted(domains, key=lambda d: d.name)
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "odm_megatron_version": __version__,
        "domains": [
            {"name": d.name, "prefix": d.prefix, "documents": d.documents, "tokens": d.tokens, **d.record}
            for d in ordered
        ],
        "tokenizer": tokenizer,
        "inputs": inputs,
        "skipped": skipped.to_json(),
        "totals": {
            "domains": len(ordered),
            "documents": sum(d.documents for d in ordered),
            "tokens": sum(d.tokens for d in ordered),
            "lines": sum(int(i.get("lines", 0)) for i in inputs),
            "skipped": skipped.total,
        },
        "options": options,
    }


def write_manifest(output_dir: str, manifest: Dict[str, Any]) -> str:
    """Write atomically (temporary name, then rename) and check it reads back."""
    path = os.path.join(output_dir, MANIFEST_NAME)
    tmp = path + PARTIAL
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:  # full disk, read-only: no manifest, so nothing looks finished
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise output_error(e, path) from None
    Manifest.load(path)  # the reader's contract, checked at the source
    return path
