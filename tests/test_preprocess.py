"""preprocess: round trip through megatron-core, manifest, formats, bad input, interruption."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from odm_megatron.cli import main as cli_main
from odm_megatron.manifest import Manifest
from odm_megatron.preprocess.domains import DomainError, DomainKey, DomainRegistry, safe_name
from odm_megatron.preprocess.fixtures import jsonl_bytes, make_documents, write_corpus
from odm_megatron.preprocess.pipeline import PreprocessConfig, PreprocessError, run_preprocess
from odm_megatron.preprocess.readers import Chunk, StreamProblem, iter_chunks
from odm_megatron.tokenizer import load_tokenizer

from fixtures_corpus import read_shard, records_by_domain, train_test_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a corpus (as records) and the corpus written as .jsonl."""
    work = tmp_path_factory.mktemp("pre")
    records = make_documents(seed=0)
    model = train_test_tokenizer(str(work), make_documents(seed=10))
    corpus = write_corpus(str(work / "corpus.jsonl"), records)
    return {"work": work, "records": records, "model": model, "corpus": corpus, "tok": load_tokenizer(model)}


def preprocess(args, capsys=None):
    rc = cli_main(["preprocess", *[str(a) for a in args]])
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def shard_files(directory):
    return sorted(n for n in os.listdir(directory) if n != "manifest.json")


def manifest_without_time(directory):
    raw = json.load(open(os.path.join(directory, "manifest.json")))
    raw.pop("created")
    return raw


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("append_eod", [False, True])
def test_round_trip_per_domain_and_manifest_counts(env, tmp_path, capsys, append_eod):
    out = tmp_path / "out"
    rc, io = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out]
                        + (["--append-eod"] if append_eod else []), capsys)
    assert rc == 0, io.err
    tok = env["tok"]
    expected = records_by_domain(env["records"])
    manifest = Manifest.load(str(out))
    assert manifest.domain_names == sorted(expected)
    for entry in manifest.domains:
        docs = read_shard(entry.prefix)
        want = [tok.encode(t) + ([tok.eod] if append_eod else []) for t in expected[entry.name]]
        assert docs == want, entry.name
        assert entry.documents == len(want)
        assert entry.tokens == sum(len(w) for w in want)
    assert manifest.tokenizer.eod_id == tok.eod and manifest.tokenizer.vocab_size == tok.vocab_size
    assert manifest.tokenizer.sha256 == tok.sha256 and manifest.tokenizer.path == os.path.abspath(env["model"])
    raw = manifest.raw
    assert raw["domains"][0]["prefix"] == "DM_Mathematics_text_document"  # relative, sorted by name
    assert raw["inputs"] == [{"path": os.path.abspath(env["corpus"]), "size": os.path.getsize(env["corpus"]),
                              "lines": len(env["records"]), "documents": len(env["records"]),
                              "tokens": raw["totals"]["tokens"]}]
    assert raw["skipped"] == {} and raw["options"]["append_eod"] is append_eod
    assert raw["totals"]["documents"] == len(env["records"])
    prior = manifest.natural_prior()
    tokens = np.array([d.tokens for d in manifest.domains], dtype=float)
    assert np.allclose(prior, tokens / tokens.sum())
    assert "Wikipedia (en)" in io.out and "skipped 0 lines" in io.out


def test_shards_use_smallest_dtype(env, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_preprocess(PreprocessConfig([env["corpus"]], env["model"], str(tmp_path / "o")))
    ds = IndexedDataset(str(tmp_path / "o" / "Pile-CC_text_document"))
    assert ds.index.dtype == np.uint16
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document


def test_output_identical_for_any_worker_count(env, tmp_path):
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out,
                            "--workers", workers, "--chunk-mb", "0.001", "--append-eod"])
        assert rc == 0
        outputs.append(out)
    names = shard_files(outputs[0])
    assert len(names) == 10
    for other in outputs[1:]:
        assert shard_files(other) == names
        for name in names:
            assert (outputs[0] / name).read_bytes() == (other / name).read_bytes(), name
        assert manifest_without_time(other) == manifest_without_time(outputs[0])


def test_compressed_inputs_match_plain(env, tmp_path):
    records = env["records"]
    half = len(records) // 2
    plain = write_corpus(str(tmp_path / "all.jsonl"), records)
    zst = write_corpus(str(tmp_path / "a.jsonl.zst"), records[:half], frames=4)
    gz = write_corpus(str(tmp_path / "b.jsonl.gz"), records[half:])
    preprocess(["--input", plain, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "plain"])
    rc, _ = preprocess(["--input", zst, gz, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "mixed",
                        "--workers", 2, "--chunk-mb", "0.002"])
    assert rc == 0
    for name in shard_files(tmp_path / "plain"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "mixed" / name).read_bytes()
    inputs = json.load(open(tmp_path / "mixed" / "manifest.json"))["inputs"]
    assert [i["lines"] for i in inputs] == [half, len(records) - half]
    assert [i["size"] for i in inputs] == [os.path.getsize(zst), os.path.getsize(gz)]


def test_domain_key_meta_source(env, tmp_path):
    rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o",
                        "--domain-key", "meta.source"])
    assert rc == 0
    manifest = Manifest.load(str(tmp_path / "o"))
    expected = records_by_domain(env["records"], key="source")
    assert manifest.domain_names == sorted(expected)
    for entry in manifest.domains:
        assert entry.documents == len(expected[entry.name])
        assert read_shard(entry.prefix) == [env["tok"].encode(t) for t in expected[entry.name]]


# --------------------------------------------------------------------------- domain names


def test_safe_names_of_pile_domains():
    assert safe_name("Wikipedia (en)") == "Wikipedia_en"
    assert safe_name("Pile-CC") == "Pile-CC"
    assert safe_name("DM Mathematics") == "DM_Mathematics"
    assert safe_name("Gutenberg (PG-19)") == "Gutenberg_PG-19"
    assert safe_name("Ubuntu IRC") == "Ubuntu_IRC"
    assert safe_name("../etc/passwd") == "etc_passwd"
    assert safe_name("日本語").startswith("domain_") and safe_name("日本語") != safe_name("中文")
    assert len(safe_name("x" * 500)) <= 100


def test_domain_key_lookup():
    key = DomainKey("meta.pile_set_name")
    assert key.lookup({"meta": {"pile_set_name": "Github"}}) == "Github"
    assert key.lookup({"meta": "Github"}) is None and key.lookup({}) is None
    assert DomainKey("source").lookup({"source": "x"}) == "x"
    with pytest.raises(ValueError):
        DomainKey("meta..x")


def test_colliding_domain_names_are_an_error(env, tmp_path, capsys):
    registry = DomainRegistry()
    registry.prefix("DM Mathematics")
    with pytest.raises(DomainError, match="both map"):
        registry.prefix("DM_Mathematics")
    with pytest.raises(DomainError):
        registry.prefix("dm mathematics")  # case-insensitive file systems
    corpus = write_corpus(str(tmp_path / "c.jsonl"), [
        {"text": "a b", "meta": {"pile_set_name": "Wikipedia (en)"}},
        {"text": "c d", "meta": {"pile_set_name": "Wikipedia en"}},
    ])
    rc, io = preprocess(["--input", corpus, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o"],
                        capsys)
    assert rc == 2 and "'Wikipedia (en)' and 'Wikipedia en'" in io.err and "Traceback" not in io.err
    assert os.listdir(tmp_path / "o") == []


# --------------------------------------------------------------------------- bad input

BAD_LINES = [
    ({"text": "good one", "meta": {"pile_set_name": "A"}}, None),
    ("{not json", "invalid_json"),
    ({"text": "no domain", "meta": {}}, "missing_domain"),
    ({"text": 42, "meta": {"pile_set_name": "A"}}, "non_string_text"),
    ({"text": "", "meta": {"pile_set_name": "A"}}, "empty_text"),
    (b'{"text": "caf\xe9", "meta": {"pile_set_name": "A"}}', "invalid_utf8"),
    ('{"text": "lone \\ud800 surrogate", "meta": {"pile_set_name": "A"}}', "invalid_utf8"),
    ({"meta": {"pile_set_name": "A"}}, "missing_text"),
    ({"text": "x", "meta": {"pile_set_name": 7}}, "invalid_domain"),
    ("[1, 2]", "not_an_object"),
    ("   ", "blank_line"),
    ({"text": "good two", "meta": {"pile_set_name": "B"}}, None),
    ("{\"text\": \"trunc", "invalid_json"),
]


def test_every_bad_line_is_counted_with_its_line_number(env, tmp_path, capsys):
    corpus = write_corpus(str(tmp_path / "bad.jsonl"), [line for line, _ in BAD_LINES])
    rc, io = preprocess(["--input", corpus, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o",
                         "--workers", 2], capsys)
    assert rc == 0, io.err
    raw = json.load(open(tmp_path / "o" / "manifest.json"))
    expected = {}
    for number, (_, reason) in enumerate(BAD_LINES, 1):
        if reason:
            expected.setdefault(reason, []).append([os.path.abspath(corpus), number])
    assert {r: v["first"] for r, v in raw["skipped"].items()} == expected
    assert {r: v["count"] for r, v in raw["skipped"].items()} == {r: len(v) for r, v in expected.items()}
    assert raw["totals"]["documents"] == 2 and raw["totals"]["lines"] == len(BAD_LINES)
    assert raw["totals"]["skipped"] == len(BAD_LINES) - 2
    assert [(d["name"], d["documents"]) for d in raw["domains"]] == [("A", 1), ("B", 1)]
    assert "skipped 11 line(s)" in io.out
    assert f"invalid_json: 2 (line is not valid JSON) at {os.path.abspath(corpus)}:2, " in io.out


@pytest.mark.parametrize("index", [i for i, (_, reason) in enumerate(BAD_LINES) if reason])
def test_strict_stops_at_the_first_bad_line(env, tmp_path, capsys, index):
    lines = [BAD_LINES[0][0], BAD_LINES[index][0], BAD_LINES[-2][0]]
    corpus = write_corpus(str(tmp_path / "bad.jsonl"), lines)
    rc, io = preprocess(["--input", corpus, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o",
                         "--strict"], capsys)
    assert rc == 2
    assert f"{corpus}:2:" in io.err and f"[{BAD_LINES[index][1]}]" in io.err and "Traceback" not in io.err
    assert os.listdir(tmp_path / "o") == []  # nothing that looks like output


def _truncated_zst(tmp_path, records):
    path = write_corpus(str(tmp_path / "t.jsonl.zst"), records, frames=2)
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) - 40])
    return path


def test_truncated_zst_is_counted_and_complete_lines_kept(env, tmp_path, capsys):
    records = env["records"]
    path = _truncated_zst(tmp_path, records)
    rc, io = preprocess(["--input", path, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o",
                         "--allow-truncated-input"], capsys)
    assert rc == 0
    raw = json.load(open(tmp_path / "o" / "manifest.json"))
    skipped = raw["skipped"]
    assert list(skipped) == ["truncated_stream"] and skipped["truncated_stream"]["count"] == 1
    (_, line), = skipped["truncated_stream"]["first"]
    documents = raw["totals"]["documents"]
    assert documents == line - 1 and len(records) // 2 < documents < len(records)
    assert "truncated_stream: 1" in io.out
    # the documents kept are exactly the first ones
    tok = env["tok"]
    want = records_by_domain(records[:documents])
    for entry in Manifest.load(str(tmp_path / "o")).domains:
        assert read_shard(entry.prefix) == [tok.encode(t) for t in want[entry.name]]
    rc, io = preprocess(["--input", path, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "s",
                         "--strict"], capsys)
    assert rc == 2 and f"{path}:{line}:" in io.err and "truncated_stream" in io.err


def test_truncated_and_corrupt_gzip(env, tmp_path):
    data = gzip.compress(jsonl_bytes(env["records"]))
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    items = list(iter_chunks(str(tmp_path / "t.jsonl.gz")))
    assert isinstance(items[-1], StreamProblem) and items[-1].reason == "truncated_stream"
    (tmp_path / "c.jsonl.zst").write_bytes(b"definitely not zstd" * 10)
    items = list(iter_chunks(str(tmp_path / "c.jsonl.zst")))
    assert len(items) == 1 and items[0].reason == "corrupt_stream" and items[0].line == 1


def test_reader_chunks_number_lines_and_keep_a_last_line_without_newline(tmp_path):
    data = b"".join(b'{"i": %d}\n' % i for i in range(1, 101)) + b'{"i": 101}'
    (tmp_path / "x.jsonl").write_bytes(data)
    chunks = list(iter_chunks(str(tmp_path / "x.jsonl"), chunk_bytes=64))
    assert all(isinstance(c, Chunk) for c in chunks) and len(chunks) > 5
    assert b"".join(c.data for c in chunks) == data
    for c in chunks:
        first = json.loads(c.data.split(b"\n")[0])["i"]
        assert first == c.first_line and c.num_lines == len(c.data.rstrip(b"\n").split(b"\n"))
    assert sum(c.num_lines for c in chunks) == 101


def test_only_bad_lines_is_an_error(env, tmp_path, capsys):
    corpus = write_corpus(str(tmp_path / "bad.jsonl"), ["{oops", ""])
    rc, io = preprocess(["--input", corpus, "--tokenizer-model", env["model"], "--output-dir", tmp_path / "o"], capsys)
    assert rc == 2 and "no documents found" in io.err and "invalid_json" in io.err
    assert os.listdir(tmp_path / "o") == []


# --------------------------------------------------------------------------- output dir, interruption


def test_refuses_non_empty_output_dir_unless_overwrite(env, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "Old_text_document.bin").write_bytes(b"stale")
    (out / "Old_text_document.idx").write_bytes(b"stale")
    (out / "notes.txt").write_text("keep me")
    rc, io = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out], capsys)
    assert rc == 2 and "not empty" in io.err and "--overwrite" in io.err
    rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out,
                        "--overwrite"], capsys)
    assert rc == 0
    assert not (out / "Old_text_document.bin").exists() and (out / "notes.txt").read_text() == "keep me"


def test_interrupted_run_leaves_no_complete_looking_shard(env, tmp_path, monkeypatch, capsys):
    from odm_megatron.preprocess import writer

    calls = {"n": 0}
    original = writer.ShardWriter.add_documents

    def interrupt_later(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(writer.ShardWriter, "add_documents", interrupt_later)
    out = tmp_path / "o"
    rc, io = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out,
                         "--chunk-mb", "0.001", "--workers", 2], capsys)
    assert rc == 130 and "interrupted" in io.err
    assert os.listdir(out) == []  # partial files removed, nothing renamed, no manifest


def test_a_dying_worker_is_an_error_not_a_hang(env, tmp_path, monkeypatch, capsys):
    from odm_megatron.preprocess import worker

    original = worker.ChunkProcessor.__call__

    def die_on_later_chunks(self, job):
        if job[1] > 30:  # first_line: the workers are forked, so they see this patch
            os._exit(1)
        return original(self, job)

    monkeypatch.setattr(worker.ChunkProcessor, "__call__", die_on_later_chunks)
    out = tmp_path / "o"
    rc, io = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out,
                         "--chunk-mb", "0.001", "--workers", 2], capsys)
    assert rc == 2 and "worker process died" in io.err
    assert os.listdir(out) == []


def test_killed_run_leaves_only_partial_files(env, tmp_path, monkeypatch):
    """A hard kill (no cleanup possible) leaves `.partial` files, never `<prefix>.bin/.idx` or a manifest."""
    from odm_megatron.preprocess import writer

    out = tmp_path / "o"
    original = writer.ShardWriter.add_documents
    calls = []

    def add_then_die(self, *args):
        original(self, *args)
        calls.append(1)
        if len(calls) == 3:
            for builder in self._builders.values():
                builder.data_file.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(writer.ShardWriter, "add_documents", add_then_die)
    pid = os.fork()  # a child with everything imported already: cheaper than a new interpreter
    if pid == 0:
        try:
            run_preprocess(PreprocessConfig([env["corpus"]], env["model"], str(out), chunk_bytes=1000))
        finally:
            os._exit(3)  # never return into pytest
    _, status = os.waitpid(pid, 0)
    monkeypatch.undo()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    names = os.listdir(out)
    assert names and all(n.endswith(".bin.partial") for n in names)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for n in names:
        assert not IndexedDataset.exists(str(out / n[: -len(".bin.partial")]))
    rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out])
    assert rc == 2
    rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", env["model"], "--output-dir", out,
                        "--overwrite"])
    assert rc == 0 and not [n for n in os.listdir(out) if n.endswith(".partial")]


# --------------------------------------------------------------------------- CLI


def test_missing_input_and_bad_tokenizer_are_one_line_errors(env, tmp_path, capsys):
    rc, io = preprocess(["--input", tmp_path / "nope.jsonl.zst", "--tokenizer-model", env["model"],
                         "--output-dir", tmp_path / "o"], capsys)
    assert rc == 2 and "input not found" in io.err and len(io.err.strip().splitlines()) == 1
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"garbage")
    rc, io = preprocess(["--input", env["corpus"], "--tokenizer-model", bad, "--output-dir", tmp_path / "o"], capsys)
    assert rc == 2 and "not a readable SentencePiece model" in io.err and len(io.err.strip().splitlines()) == 1
    (tmp_path / "x.jsonl.xz").write_bytes(b"")
    rc, io = preprocess(["--input", tmp_path / "x.jsonl.xz", "--tokenizer-model", env["model"],
                         "--output-dir", tmp_path / "o"], capsys)
    assert rc == 2 and "unsupported compression" in io.err
    rc, io = preprocess(["--input", env["corpus"], env["corpus"], "--tokenizer-model", env["model"],
                         "--output-dir", tmp_path / "o"], capsys)
    assert rc == 2 and "given twice" in io.err
    with pytest.raises(PreprocessError):
        PreprocessConfig([env["corpus"]], env["model"], str(tmp_path), workers=0)


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["preprocess", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--input", "--tokenizer-model", "--output-dir", "--workers", "--domain-key", "--append-eod",
                 "--strict", "--overwrite", "--chunk-mb", "--no-progress"):
        assert flag in out
    assert "byte-identical" in out and "meta.source" in out


def test_progress_bar_only_on_request_or_terminal(env, tmp_path, capsys):
    run_preprocess(PreprocessConfig([env["corpus"]], env["model"], str(tmp_path / "quiet")))
    assert "preprocess:" not in capsys.readouterr().err  # stderr is not a terminal here
    run_preprocess(PreprocessConfig([env["corpus"]], env["model"], str(tmp_path / "bar"), progress=True))
    err = capsys.readouterr().err
    assert "docs/s" in err and "tok/s" in err and "MB/s" in err


def test_python_dash_m_subprocess(env, tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "odm_megatron", "preprocess", "--input", env["corpus"],
                           "--tokenizer-model", env["model"], "--output-dir", str(out), "--workers", "2",
                           "--append-eod"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "documents" in proc.stdout and "Pile-CC" in proc.stdout
    assert "Traceback" not in proc.stderr and "Transformer Engine" not in proc.stderr
    assert Manifest.load(str(out)).domain_names[0] == "DM Mathematics"


def test_huggingface_tokenizer_round_trip(env, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([r["text"] for r in env["records"]], trainer=trainer)
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    rc, _ = preprocess(["--input", env["corpus"], "--tokenizer-model", path, "--output-dir", tmp_path / "o",
                        "--append-eod", "--workers", 2])
    assert rc == 0
    manifest = Manifest.load(str(tmp_path / "o"))
    assert manifest.tokenizer.type == "huggingface" and manifest.tokenizer.eod_id == 1
    expected = records_by_domain(env["records"])
    for entry in manifest.domains:
        want = [hf.encode(t, add_special_tokens=False).ids + [1] for t in expected[entry.name]]
        assert read_shard(entry.prefix) == want


def test_more_domains_than_open_files_is_a_clear_error(env, tmp_path):
    """Every domain keeps a shard open while writing: past the (hard) open-file limit the run
    stops with a message naming the limit, no traceback, no shards left behind."""
    import resource

    limit = 96
    corpus = write_corpus(str(tmp_path / "c.jsonl"), [
        {"text": f"words of domain {i}", "meta": {"pile_set_name": f"D{i:03d}"}} for i in range(2 * limit)
    ])

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "odm_megatron", "preprocess", "--input", corpus, "--tokenizer-model", env["model"],
         "--output-dir", str(tmp_path / "o"), "--workers", "1"],
        capture_output=True, text=True, preexec_fn=low_limit, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "open-file limit" in proc.stderr and "ulimit -n" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith((".bin", ".idx", ".partial"))]
