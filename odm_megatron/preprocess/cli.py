"""``odm-megatron preprocess``: Pile-format jsonl into per-domain Megatron shards + manifest."""
from __future__ import annotations

import argparse
import sys

from odm_megatron.preprocess.pipeline import DEFAULT_DOMAIN_KEY, USER_ERRORS, PreprocessConfig, PreprocessResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="input files, one JSON document per line: .jsonl, .jsonl.zst (multi-frame too) or "
                             ".jsonl.gz; read as a stream, in the order given")
    parser.add_argument("--tokenizer-model", required=True, metavar="MODEL",
                        help="a SentencePiece .model (e.g. from `odm-megatron train-tokenizer`) or a HuggingFace "
                             "tokenizer.json (needs the `tokenizers` package)")
    parser.add_argument("--output-dir", required=True, metavar="DIR",
                        help="where DIR/<domain>_text_document.bin/.idx and DIR/manifest.json go; must be empty "
                             "or new unless --overwrite")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="tokenizer processes; 1 tokenizes in this process. The output is byte-identical "
                             "for any N")
    parser.add_argument("--domain-key", default=DEFAULT_DOMAIN_KEY, metavar="DOTTED.KEY",
                        help="dotted path of each document's domain name, e.g. meta.pile_set_name or meta.source")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the tokenizer's end-of-document id to every document")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first bad line (bad JSON or UTF-8, missing domain, empty or non-string "
                             "text, truncated stream) with its file and line, instead of counting and skipping it")
    parser.add_argument("--allow-truncated-input", action="store_true",
                        help="a .zst/.gz input that ends early or is corrupt is an error (naming the file and "
                             "how far it got); with this flag the lines read before the damage are kept, "
                             "with a warning, and the loss is counted in the manifest")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty output directory; its manifest and *_text_document.bin/.idx "
                             "files are removed first, other files are kept")
    parser.add_argument("--chunk-mb", type=float, default=1.0, metavar="MB",
                        help="text handed to a worker at a time; larger cuts inter-process overhead, smaller "
                             "cuts memory")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar even on a terminal (it is never shown when stderr is not a terminal)")


def main(args: argparse.Namespace) -> int:
    try:
        from odm_megatron.preprocess.pipeline import run_preprocess

        config = PreprocessConfig(
            inputs=list(args.input),
            tokenizer_model=args.tokenizer_model,
            output_dir=args.output_dir,
            workers=args.workers,
            domain_key=args.domain_key,
            append_eod=args.append_eod,
            strict=args.strict,
            overwrite=args.overwrite,
            allow_truncated_input=args.allow_truncated_input,
            chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
            progress=False if args.no_progress else None,
        )
        result = run_preprocess(config)
    except USER_ERRORS as e:
        print(f"odm-megatron preprocess: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("odm-megatron preprocess: interrupted; no shards were kept", file=sys.stderr)
        return 130
    print(format_summary(result))
    return 0


def format_summary(result: PreprocessResult) -> str:
    """The end-of-run report: per-domain sizes, then every skip reason with where it happened."""
    m = result.manifest
    totals = m["totals"]
    mb = result.input_bytes / 1e6
    lines = [
        f"preprocess: {totals['documents']:,} documents, {totals['tokens']:,} tokens in {totals['domains']} domains "
        f"from {len(m['inputs'])} file(s), {mb:,.1f} MB in {result.seconds:.1f} s "
        f"({mb / max(result.seconds, 1e-9):.1f} MB/s) -> {result.manifest_path}",
    ]
    width = max(len(d["name"]) for d in m["domains"])
    for d in m["domains"]:
        share = d["tokens"] / max(totals["tokens"], 1)
        lines.append(f"  {d['name']:<{width}}  {d['documents']:>10,} docs  {d['tokens']:>14,} tokens  "
                     f"{share:6.1%}  {d['prefix']}")
    if result.skipped.total:
        lines.append(f"skipped {result.skipped.total:,} line(s):")
        lines.extend("  " + s for s in result.skipped.summary_lines())
    else:
        lines.append("skipped 0 lines")
    return "\n".join(lines)
