"""How much of `odm-megatron preprocess` is the tokenizer, and how well it uses 2 cores.

Measures, in one run, on the same slice of a Pile-format file:

  (a) raw tokenizer throughput: the slice's documents encoded in a loop in one process
      (``tokenizer.encode(text)`` per document; JSON parsing not timed);
  (b) ``run_preprocess`` with 1 worker: read + decompress + parse + route + tokenize + write;
  (c) ``run_preprocess`` with 2 workers.

Targets: (b) >= 85% of (a); (c) >= 1.7x (b). (b) and (c) are timed in this process with
megatron-core already imported, i.e. steady-state throughput; the cold start of the CLI
(``python -m odm_megatron preprocess``, which imports torch + megatron-core, ~5 s here) is
measured separately and reported next to it. Runs are interleaved (a, b, c, a, b, c, ...) and
the best of ``--repeats`` is kept, so load from other processes hurts all three alike; the load
average is recorded.

Example (from the repository root):

    python benchmarks/preprocess_throughput.py --slice-mb 40 --repeats 3

With no ``--tokenizer-model``, a BPE 8192 SentencePiece model is trained once with
``odm-megatron train-tokenizer`` on the whole input (20 MB domain-balanced sample) and cached
in ``--work-dir``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_INPUT = "../shared/data/mini_pile/train/00.jsonl.zst"  # relative to the repository root


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help="Pile-format .jsonl.zst; a relative path is taken from the repository root")
    p.add_argument("--slice-mb", type=float, default=40.0,
                   help="size of the slice (jsonl MB), documents taken evenly through the file")
    p.add_argument("--tokenizer-model", default=None, help="a SentencePiece model; default: train one (cached)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained model")
    p.add_argument("--work-dir", default="/tmp/odm_preprocess_bench", help="slice, model and outputs go here")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each of (a), (b), (c); best is kept")
    p.add_argument("--no-cold", action="store_true", help="skip the cold-start CLI measurement")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each repeat, wait up to this long for the load average to fall below --idle-load")
    p.add_argument("--idle-load", type=float, default=0.5, help="load average that counts as idle")
    p.add_argument("--output-json", default=os.path.join(REPO, "docs", "benchmarks", "preprocess_throughput.json"),
                   help="where the numbers go")
    return p.parse_args(argv)


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def make_slice(path: str, slice_mb: float, out_path: str) -> dict:
    """Every k-th line of ``path`` (k chosen for ~slice_mb), as one .jsonl.zst."""
    import zstandard

    def lines():
        with open(path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            yield from io.BufferedReader(reader, 1 << 20)

    total = sum(len(line) for line in lines())
    stride = max(1, round(total / (slice_mb * 1e6)))
    picked = [line for i, line in enumerate(lines()) if i % stride == 0]
    data = b"".join(picked)
    with open(out_path, "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(data))
    return {"source": path, "source_mb": round(total / 1e6, 2), "stride": stride, "documents": len(picked),
            "jsonl_mb": round(len(data) / 1e6, 3), "zst_mb": round(os.path.getsize(out_path) / 1e6, 3)}


def ensure_tokenizer(args, input_path: str) -> str:
    if args.tokenizer_model:
        return args.tokenizer_model
    prefix = os.path.join(args.work_dir, f"bpe{args.vocab_size}")
    if not os.path.exists(prefix + ".model"):
        from odm_megatron.cli import main as cli_main

        print(f"training a BPE {args.vocab_size} tokenizer on {input_path} (cached as {prefix}.model) ...")
        rc = cli_main(["train-tokenizer", "--input", input_path, "--vocab-size",
                       str(args.vocab_size), "--model-type", "bpe", "--output", prefix, "--sample-bytes", "20M"])
        if rc != 0:
            sys.exit(rc)
    return prefix + ".model"


def read_texts(slice_path: str) -> list:
    import zstandard

    with open(slice_path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [json.loads(line)["text"] for line in data.splitlines() if line.strip()]


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_raw(tokenizer, texts) -> tuple:
    cpu, start = cpu_seconds(), time.perf_counter()
    tokens = 0
    for text in texts:
        tokens += len(tokenizer.encode(text))
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens


def measure_preprocess(slice_path, model, out_dir, workers) -> tuple:
    from odm_megatron.preprocess.pipeline import PreprocessConfig, run_preprocess

    cpu, start = cpu_seconds(), time.perf_counter()
    result = run_preprocess(PreprocessConfig([slice_path], model, out_dir, workers=workers, overwrite=True,
                                             progress=False))
    return time.perf_counter() - start, cpu_seconds() - cpu, result.tokens, result.documents


def wait_for_idle(max_seconds: float, threshold: float) -> float:
    """Wait (up to max_seconds) for the 1-minute load average to drop below threshold."""
    start = time.time()
    while time.time() - start < max_seconds and os.getloadavg()[0] >= threshold:
        time.sleep(5)
    return time.time() - start


def measure_cold_cli(slice_path, model, out_dir, workers) -> float:
    cmd = [sys.executable, "-m", "odm_megatron", "preprocess", "--input", slice_path,
           "--tokenizer-model", model, "--output-dir", out_dir, "--workers", str(workers), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def same_outputs(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n != "manifest.json")
    if names != sorted(n for n in os.listdir(b) if n != "manifest.json"):
        return False
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def main(argv=None) -> int:
    args = parse_args(argv)
    input_path = args.input if os.path.isabs(args.input) else os.path.normpath(os.path.join(REPO, args.input))
    if not os.path.isfile(input_path):
        print(f"input not found: {input_path}", file=sys.stderr)
        return 2
    os.makedirs(args.work_dir, exist_ok=True)
    load_start = load()
    slice_path = os.path.join(args.work_dir, "slice.jsonl.zst")
    slice_info = make_slice(input_path, args.slice_mb, slice_path)
    print(f"slice: {slice_info}")
    model = ensure_tokenizer(args, input_path)

    from odm_megatron.preprocess.writer import indexed_dataset_module
    from odm_megatron.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    indexed_dataset_module()  # import torch + megatron-core once, outside the timings
    import_seconds = time.perf_counter() - t0
    tokenizer = load_tokenizer(model)
    texts = read_texts(slice_path)
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    jsonl_mb = slice_info["jsonl_mb"]

    runs = {"a_raw": [], "b_workers1": [], "c_workers2": []}
    cpu = {k: [] for k in runs}
    loads, waited = [], []
    counts = {}
    for r in range(args.repeats):
        if args.wait_idle:
            waited.append(round(wait_for_idle(args.wait_idle, args.idle_load), 1))
        seconds, cpu_s, tokens = measure_raw(tokenizer, texts)
        runs["a_raw"].append(seconds)
        cpu["a_raw"].append(cpu_s)
        counts["a_tokens"] = tokens
        for key, workers in (("b_workers1", 1), ("c_workers2", 2)):
            seconds, cpu_s, tokens, documents = measure_preprocess(
                slice_path, model, os.path.join(args.work_dir, key), workers)
            runs[key].append(seconds)
            cpu[key].append(cpu_s)
            counts[key + "_tokens"], counts["documents"] = tokens, documents
        loads.append(load())
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s (cpu {cpu[k][-1]:.2f} s)" for k, v in runs.items())
              + f"; load {loads[-1]}")

    identical = same_outputs(os.path.join(args.work_dir, "b_workers1"), os.path.join(args.work_dir, "c_workers2"))
    best = {k: min(v) for k, v in runs.items()}
    tokens = counts["a_tokens"]
    assert counts["b_workers1_tokens"] == counts["c_workers2_tokens"] == tokens, counts

    def rates(key):
        seconds = best[key]
        return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu[key][runs[key].index(seconds)], 3),
                "tokens_per_s": round(tokens / seconds),
                "text_mb_per_s": round(text_mb / seconds, 3), "jsonl_mb_per_s": round(jsonl_mb / seconds, 3),
                "documents_per_s": round(counts["documents"] / seconds, 1)}

    cold = {}
    if not args.no_cold:
        for workers in (1, 2):
            cold[f"workers{workers}_seconds"] = round(
                measure_cold_cli(slice_path, model, os.path.join(args.work_dir, f"cold{workers}"), workers), 3)
    b_over_a = best["a_raw"] / best["b_workers1"]
    c_over_b = best["b_workers1"] / best["c_workers2"]
    result = {
        "command": "python benchmarks/preprocess_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_before": load_start, "load_after_each_repeat": loads, "load_end": load()},
        "slice": {**slice_info, "text_mb": round(text_mb, 3), "tokens": tokens},
        "tokenizer": {"path": model, "vocab_size": tokenizer.vocab_size, "type": tokenizer.type},
        "repeats": args.repeats,
        "all_seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "all_cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "waited_for_idle_seconds": waited,
        "a_raw_tokenizer": rates("a_raw"),
        "b_preprocess_1_worker": rates("b_workers1"),
        "c_preprocess_2_workers": rates("c_workers2"),
        "b_over_a": round(b_over_a, 3),
        "b_over_a_cpu": round(min(cpu["a_raw"]) / min(cpu["b_workers1"]), 3),
        "c_over_b": round(c_over_b, 3),
        "targets": {"b_over_a>=0.85": b_over_a >= 0.85, "c_over_b>=1.7": c_over_b >= 1.7},
        "outputs_identical_1_vs_2_workers": identical,
        "import_torch_megatron_seconds": round(import_seconds, 3),
        "cold_cli_seconds_including_imports": cold,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("a_raw_tokenizer", "b_preprocess_1_worker", "c_preprocess_2_workers",
                                             "b_over_a", "b_over_a_cpu", "c_over_b", "targets", "outputs_identical_1_vs_2_workers",
                                             "cold_cli_seconds_including_imports")}, indent=1))
    print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
