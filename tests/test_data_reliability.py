"""Data reliability: shards checked at start-up, content-keyed index caches, hostile input lines,
truncated compressed inputs, unwritable outputs, non-finite losses, and processes that cannot
clobber each other (docs/reliability.md, section "Data, preprocessing and processes")."""
from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from odm_megatron.cli import main as cli_main
from odm_megatron.manifest import Manifest, shard_record
from odm_megatron.preprocess.fixtures import jsonl_bytes, make_documents, write_corpus

from core_fixtures import write_indexed_dataset
from fixtures_corpus import read_shard, train_test_tokenizer
from training_fixtures import REPO, TINY_MODEL, VOCAB_SIZE, make_corpus, run_cli


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    work = tmp_path_factory.mktemp("tok")
    return train_test_tokenizer(str(work), make_documents(seed=10))


def _preprocess(capsys, *args):
    rc = cli_main(["preprocess", "--no-progress", *[str(a) for a in args]])
    return rc, capsys.readouterr()


def _one_line_error(io, rc, *needles):
    assert rc == 2, (rc, io.out[-2000:], io.err[-2000:])
    lines = [line for line in io.err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in io.err, io.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- 9. hostile JSON lines ----------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_deeply_nested_line_is_a_counted_bad_line(tok, tmp_path, capsys, workers):
    records = make_documents(seed=1)
    nested_meta = b'{"text": "deep meta", "meta": ' + b"[" * 100_000 + b"}"
    lines = [json.dumps(r).encode() for r in records[:10]] + [b"[" * 100_000, nested_meta] + [
        json.dumps(r).encode() for r in records[10:]]
    corpus = tmp_path / "deep.jsonl"
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", tmp_path / "o",
                         "--workers", workers, "--chunk-mb", "0.05")
    assert rc == 0, io.err[-3000:]
    assert "RecursionError" not in io.err + io.out
    skipped = json.load(open(tmp_path / "o" / "manifest.json"))["skipped"]
    assert list(skipped) == ["too_deeply_nested"] and skipped["too_deeply_nested"]["count"] == 2
    assert [n for _, n in skipped["too_deeply_nested"]["first"]] == [11, 12]
    assert json.load(open(tmp_path / "o" / "manifest.json"))["totals"]["documents"] == len(records)


# --- 11. truncated or corrupt compressed inputs -------------------------------------------------

def _truncated(tmp_path, kind):
    records = make_documents(seed=2)
    if kind == "zst":
        path = write_corpus(str(tmp_path / "t.jsonl.zst"), records, frames=3)
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[: len(blob) * 2 // 3])
    elif kind == "gz":
        path = str(tmp_path / "t.jsonl.gz")
        blob = gzip.compress(jsonl_bytes(records))
        open(path, "wb").write(blob[: len(blob) // 2])
    else:  # corrupt zstd: garbage in the middle of a frame
        path = write_corpus(str(tmp_path / "c.jsonl.zst"), records, frames=3)
        blob = bytearray(open(path, "rb").read())
        blob[len(blob) * 2 // 3: len(blob) * 2 // 3 + 64] = b"\xff" * 64
        open(path, "wb").write(bytes(blob))
    return path, records


@pytest.mark.parametrize("kind", ["zst", "gz", "corrupt-zst"])
def test_truncated_compressed_input_is_an_error_unless_allowed(tok, tmp_path, capsys, caplog, kind):
    path, records = _truncated(tmp_path, kind)
    rc, io = _preprocess(capsys, "--input", path, "--tokenizer-model", tok, "--output-dir", tmp_path / "o")
    line = _one_line_error(io, rc, path, "complete lines", "bytes decompressed", "--allow-truncated-input")
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith((".bin", ".idx", ".partial"))]
    # the flag keeps the complete lines read, with a warning, and records the loss
    rc, io = _preprocess(capsys, "--input", path, "--tokenizer-model", tok, "--output-dir", tmp_path / "k",
                         "--allow-truncated-input")
    assert rc == 0, io.err
    assert "keeping the lines read so far (--allow-truncated-input)" in caplog.text
    manifest = json.load(open(tmp_path / "k" / "manifest.json"))
    reason = "corrupt_stream" if kind.startswith("corrupt") else "truncated_stream"
    assert list(manifest["skipped"]) == [reason]
    kept = manifest["totals"]["documents"]
    assert 0 < kept < len(records)
    assert f"after {kept:,} complete lines" in line


# --- 5. shards checked against the manifest at start-up -----------------------------------------

def _uneven_corpus(directory, vocab_size=VOCAB_SIZE, records=True):
    """Three domains with different document counts and lengths (so their .idx files differ),
    and a manifest as preprocess writes it (with shard records unless ``records`` is False)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i, (name, n_docs) in enumerate((("counting", 50), ("motif", 70), ("noise", 90))):
        docs = [np.append(rng.integers(1, VOCAB_SIZE, size=int(rng.integers(40, 100))), 0) for _ in range(n_docs)]
        prefix = os.path.join(directory, f"{name}_text_document")
        write_indexed_dataset(prefix, docs)
        entry = {"name": name, "prefix": f"{name}_text_document", "documents": n_docs,
                 "tokens": int(sum(len(d) for d in docs))}
        if records:
            entry.update(shard_record(prefix))
        entries.append(entry)
    manifest = {"format": "odm-megatron-manifest", "version": 1, "domains": entries,
                "tokenizer": {"path": "none.model", "type": "sentencepiece", "vocab_size": vocab_size, "eod_id": 0}}
    path = os.path.join(directory, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def _train_argv(manifest, *extra):
    return ["train", "--manifest", str(manifest), *TINY_MODEL, "--global-batch-size", "8", "--train-iters", "2",
            "--eval-interval", "0", *extra]


def test_preprocess_records_what_train_checks(tok, tmp_path, capsys):
    records = make_documents(seed=3)
    corpus = write_corpus(str(tmp_path / "c.jsonl"), records)
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", tmp_path / "o")
    assert rc == 0, io.err
    manifest = Manifest.load(str(tmp_path / "o"))
    for d in manifest.domains:
        assert d.has_shard_record
        assert d.bin_bytes == os.path.getsize(d.prefix + ".bin") and d.idx_bytes == os.path.getsize(d.prefix + ".idx")
        assert d.max_token_id == max(max(doc) for doc in read_shard(d.prefix))
        assert d.idx_sha256 == shard_record(d.prefix)["idx_sha256"]
    assert manifest.verify_shards() is True


@pytest.mark.parametrize("damage", ["truncated-bin", "other-idx", "larger-idx-over-smaller-bin", "vocab"])
def test_train_refuses_a_shard_that_is_not_the_one_recorded(tmp_path, capsys, damage):
    manifest = _uneven_corpus(str(tmp_path / "d"), vocab_size=200 if damage == "vocab" else VOCAB_SIZE)
    d = str(tmp_path / "d")
    victim = os.path.join(d, "motif_text_document")
    if damage == "truncated-bin":
        with open(victim + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(victim + ".bin") - 10)
        needles = ["truncated"]
    elif damage == "other-idx":  # a smaller shard's index over this one
        shutil.copy(os.path.join(d, "counting_text_document.idx"), victim + ".idx")
        needles = [".idx is"]
    elif damage == "larger-idx-over-smaller-bin":
        shutil.copy(os.path.join(d, "noise_text_document.idx"), victim + ".idx")
        needles = [".idx is"]
    else:
        victim = os.path.join(d, "counting_text_document")
        needles = ["beyond the vocabulary of 200"]
    rc = cli_main(_train_argv(manifest, "--log-dir", str(tmp_path / "logs")))
    io = capsys.readouterr()
    line = _one_line_error(io, rc, victim, *needles)
    assert "domain" in line
    assert not os.path.exists(tmp_path / "logs"), "refused before anything was built or written"


@pytest.mark.parametrize("damage", ["truncated-bin", "larger-idx-over-smaller-bin"])
def test_shard_structure_checked_without_a_manifest_record(tmp_path, capsys, caplog, damage):
    """--data-path shards and older manifests (no records: a warning) still get the .idx/.bin check."""
    manifest = _uneven_corpus(str(tmp_path / "d"), records=False)
    d = str(tmp_path / "d")
    victim = os.path.join(d, "motif_text_document")
    if damage == "truncated-bin":
        with open(victim + ".bin", "r+b") as f:
            f.truncate(os.path.getsize(victim + ".bin") - 10)
    else:
        shutil.copy(os.path.join(d, "noise_text_document.idx"), victim + ".idx")
    with caplog.at_level("WARNING"):
        rc = cli_main(_train_argv(manifest))
    io = capsys.readouterr()
    _one_line_error(io, rc, victim + ".bin", "indexes")
    assert "cannot be checked against the manifest" in caplog.text
    rc = cli_main(["train", "--data-path", "1", os.path.join(d, "counting_text_document"), "1", victim,
                   "--vocab-size", "256", "--eod-id", "0", *TINY_MODEL, "--global-batch-size", "8",
                   "--train-iters", "2", "--eval-interval", "0"])
    _one_line_error(capsys.readouterr(), rc, victim + ".bin")


# --- 6. index caches keyed by content ------------------------------------------------------------

def test_index_cache_follows_a_remade_shard(tok, tmp_path, capsys):
    """preprocess; train (default cache next to the data); preprocess --overwrite with other data;
    train again: the new shards' sample counts, no stale index, no IndexError."""
    out = tmp_path / "data"
    small = write_corpus(str(tmp_path / "a.jsonl"), make_documents(seed=4))
    big = write_corpus(str(tmp_path / "b.jsonl"), make_documents(
        {"Pile-CC": 90, "Wikipedia (en)": 60, "DM Mathematics": 40, "Github": 40, "Enron Emails": 12}, seed=5))
    argv = ["train", "--manifest", str(out / "manifest.json"), "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "2", "--seq-length", "32", "--micro-batch-size", "4",
            "--global-batch-size", "8", "--train-iters", "1", "--eval-interval", "0", "--no-tensorboard"]
    counts = []
    for corpus in (small, big):
        rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", out, "--overwrite")
        assert rc == 0, io.err
        proc = run_cli(argv + ["--log-dir", str(tmp_path / f"logs{len(counts)}")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "IndexError" not in proc.stderr
        counts.append(_sample_counts(out, tmp_path / f"fresh{len(counts)}"))
        assert os.path.isdir(out / "cache")  # the default cache, next to the data
    assert counts[0] != counts[1]
    # what train built (through the default cache) is what a fresh cache gives for the new shards
    from odm_megatron.dataset import TokenizerSpec, build_domain_datasets, make_gpt_dataset_config

    manifest = Manifest.load(str(out))
    cfg = make_gpt_dataset_config(seed=1234, seq_length=32, tokenizer=TokenizerSpec(manifest.tokenizer.vocab_size,
                                                                                   manifest.tokenizer.eod_id))
    datasets = build_domain_datasets(manifest.prefixes, cfg, domain_names=manifest.domain_names)
    assert [len(ds) for ds in datasets] == counts[1]
    for ds in datasets:
        ds[len(ds) - 1]  # the last sample exists in the new shard


def _sample_counts(out, fresh_cache):
    from odm_megatron.dataset import TokenizerSpec, build_domain_datasets, make_gpt_dataset_config

    manifest = Manifest.load(str(out))
    cfg = make_gpt_dataset_config(seed=1234, seq_length=32, path_to_cache=str(fresh_cache),
                                  tokenizer=TokenizerSpec(manifest.tokenizer.vocab_size, manifest.tokenizer.eod_id))
    return [len(ds) for ds in build_domain_datasets(manifest.prefixes, cfg, domain_names=manifest.domain_names)]


# --- 10. outputs that cannot be written ----------------------------------------------------------

def _can_mount_tmpfs():
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return False
    probe = "/tmp/odm-tmpfs-probe"
    os.makedirs(probe, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", probe], capture_output=True)
    return ok


@pytest.fixture
def tmpfs(tmp_path):
    """``make(size, read_only)`` -> a directory on a tiny tmpfs (a real full or read-only file system)."""
    if not _can_mount_tmpfs():
        pytest.skip("needs root and tmpfs (mount -t tmpfs) to make a real full / read-only file system")
    mounted = []

    def make(size="64k", read_only=False):
        path = tmp_path / f"mnt{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        mounted.append(str(path))
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True)


def _no_output_that_looks_done(directory):
    names = os.listdir(directory) if os.path.isdir(directory) else []
    assert "manifest.json" not in names and not [n for n in names if n.endswith((".bin", ".idx", ".partial"))], names


def test_preprocess_output_below_a_file(tok, tmp_path, capsys):
    corpus = write_corpus(str(tmp_path / "c.jsonl"), make_documents(seed=6))
    (tmp_path / "afile").write_text("x")
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", tmp_path / "afile" / "out")
    _one_line_error(io, rc, str(tmp_path / "afile" / "out"), "a part of the path is a file", "--output-dir")


def test_preprocess_on_a_full_or_read_only_file_system(tok, tmp_path, capsys, tmpfs):
    corpus = write_corpus(str(tmp_path / "c.jsonl"), make_documents(seed=6))
    full = tmpfs("8k")  # two pages: the shards do not fit
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", full / "out")
    _one_line_error(io, rc, str(full / "out"), "no space left on the device", "--output-dir")
    _no_output_that_looks_done(full / "out")
    read_only = tmpfs(read_only=True)
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", read_only / "out")
    _one_line_error(io, rc, str(read_only / "out"), "read-only file system", "--output-dir")


def test_preprocess_full_disk_at_the_manifest_leaves_nothing_that_looks_done(tok, tmp_path, capsys, monkeypatch):
    """ENOSPC injected where the manifest is written (after every shard was renamed into place)."""
    import odm_megatron.preprocess.manifest_writer as mw

    corpus = write_corpus(str(tmp_path / "c.jsonl"), make_documents(seed=6))
    real_dump = json.dump

    def full_disk(obj, f, **kw):
        if getattr(f, "name", "").endswith("manifest.json.partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(mw.json, "dump", full_disk)
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", tmp_path / "o")
    _one_line_error(io, rc, str(tmp_path / "o" / "manifest.json"), "no space left")
    _no_output_that_looks_done(tmp_path / "o")


def test_train_save_and_log_dir_that_cannot_be_written(tmp_path, capsys, tmpfs):
    manifest = make_corpus(str(tmp_path / "d"), docs_per_domain=20)
    (tmp_path / "afile").write_text("x")
    rc = cli_main(_train_argv(manifest, "--save", str(tmp_path / "afile" / "ckpt")))
    _one_line_error(capsys.readouterr(), rc, str(tmp_path / "afile" / "ckpt"), "a part of the path is a file", "--save")
    read_only = tmpfs(read_only=True)
    rc = cli_main(_train_argv(manifest, "--log-dir", str(read_only / "logs")))
    _one_line_error(capsys.readouterr(), rc, str(read_only / "logs"), "read-only file system", "--log-dir")


def test_train_checkpoint_on_a_full_disk_is_one_line(tmp_path, tmpfs):
    manifest = make_corpus(str(tmp_path / "d"), docs_per_domain=20)
    full = tmpfs("256k")  # the probe fits, a checkpoint (~1.5 MB) does not
    proc = run_cli(_train_argv(manifest, "--save", str(full / "ckpt"), "--save-interval", "1",
                               "--log-dir", str(tmp_path / "logs"), "--no-tensorboard"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("odm-megatron train: error: cannot write") and "no space left" in last, last
    assert "checkpoint of step 1 was not completed" in last
    # no checkpoint that looks complete (a temporary directory of the failed write may remain)
    assert not [n for n in os.listdir(full / "ckpt") if n.startswith("iter_") and n[5:].isdigit()]
    assert not os.path.exists(full / "ckpt" / "latest_checkpointed_iteration.txt")


# --- 12. non-finite losses -----------------------------------------------------------------------

def _strict_json_lines(path):
    def no_constants(name):
        raise AssertionError(f"{path}: bare {name} is not JSON")

    with open(path) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f if line.strip()]


def test_nonfinite_losses_stop_the_run_without_a_poisoned_checkpoint(tmp_path):
    manifest = make_corpus(str(tmp_path / "d"), docs_per_domain=20)
    logs, save = tmp_path / "logs", tmp_path / "ckpt"
    proc = run_cli(_train_argv(manifest, "--lr", "1e6", "--train-iters", "12", "--update-interval", "1",
                               "--save", str(save), "--save-interval", "1", "--log-dir", str(logs),
                               "--max-nonfinite-steps", "3", "--no-tensorboard"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = proc.stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith("odm-megatron train: error: stopped at step") and "--max-nonfinite-steps 3" in last, last
    assert "Traceback" not in err
    # reported once, with its domains; the policy's documented per-domain warning fires
    assert err.count("the update is skipped") == 1
    assert "in domain(s) counting, motif, noise" in err
    assert "non-finite loss for domain(s)" in err
    train = _strict_json_lines(logs / "train.jsonl")
    _strict_json_lines(logs / "mixture.jsonl")
    bad = [r["step"] for r in train if r.get("nonfinite")]
    assert len(bad) == 3 and all(r["loss"] is None for r in train if r.get("nonfinite"))
    assert train[-1]["step"] == bad[-1] == bad[0] + 2
    # checkpoints only before the first non-finite step, and every tensor in them finite
    saved = sorted(int(n[5:]) for n in os.listdir(save) if n.startswith("iter_"))
    assert saved and max(saved) < bad[0], (saved, bad)
    import torch

    for n in saved:
        for root, _, files in os.walk(save / f"iter_{n:07d}"):
            for name in files:
                if name.startswith("model_optim") and name.endswith(".pt"):
                    state = torch.load(os.path.join(root, name), map_location="cpu", weights_only=True)["model"]
                    assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v)
                               and v.is_floating_point())


# --- 7. processes: one job per --save, workers die with their launcher ---------------------------

def _popen_train(argv, nproc=1, log=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    if nproc == 1:
        cmd = [sys.executable, "-m", "odm_megatron", *argv]
    else:
        from training_fixtures import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "odm_megatron", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _kill_group(proc):
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_a_second_job_on_the_same_save_dir_is_refused(tmp_path, capsys):
    manifest = make_corpus(str(tmp_path / "d"), docs_per_domain=20)
    save = tmp_path / "ckpt"
    with open(tmp_path / "first.log", "w") as log:
        first = _popen_train(_train_argv(manifest, "--train-iters", "100000", "--save", str(save),
                                         "--save-interval", "100000"), log=log)
    try:
        def holds_lock():
            assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            return os.path.exists(save / ".lock") and f'"pid": {first.pid}' in open(save / ".lock").read()

        _wait_for(holds_lock, 240, "the first job to lock --save")
        rc = cli_main(_train_argv(manifest, "--save", str(save)))
        line = _one_line_error(capsys.readouterr(), rc, f"--save {save}", f"pid {first.pid}", "in use")
        assert os.uname().nodename in line
    finally:
        _kill_group(first)
    # the kernel dropped the dead job's lock: the stale file blocks nobody
    from odm_megatron.training.parallel import SaveDirLock

    SaveDirLock(str(save)).release()


def test_killing_torchrun_kills_its_workers(tmp_path):
    psutil = pytest.importorskip("psutil")
    manifest = make_corpus(str(tmp_path / "d"), docs_per_domain=20)
    logs = tmp_path / "logs"
    with open(tmp_path / "torchrun.log", "w") as log:
        launcher = _popen_train(_train_argv(manifest, "--train-iters", "100000", "--log-dir", str(logs),
                                            "--no-tensorboard", "--log-interval", "1000"), nproc=2, log=log)
    try:
        def training():
            assert launcher.poll() is None, open(tmp_path / "torchrun.log").read()[-3000:]
            path = logs / "train.jsonl"
            return os.path.exists(path) and len(open(path).read().splitlines()) >= 2

        _wait_for(training, 300, "both workers to be training")
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)]
        assert len(workers) >= 2, workers
        os.kill(launcher.pid, 9)
        launcher.wait(timeout=30)

        def gone(p):
            try:
                return p.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        _wait_for(lambda: all(gone(p) for p in workers), 15, "the workers to die with torchrun")
    finally:
        _kill_group(launcher)


# --- what already held, kept by a test ------------------------------------------------------------

def test_five_thousand_domains_and_hostile_domain_names(tok, tmp_path, capsys):
    """5,000 domains (one open shard each while writing), names that try path traversal, hidden
    files or odd characters: every domain gets its own safe shard inside --output-dir, all checked."""
    hostile = ["../../etc/passwd", "/abs/path", ".hidden", "..", "a/b\\c", "NUL:*?", "x" * 300]
    records = [{"text": f"words of domain {i}", "meta": {"pile_set_name": f"D{i:04d}"}} for i in range(5000 - len(hostile))]
    records += [{"text": f"hostile {i}", "meta": {"pile_set_name": name}} for i, name in enumerate(hostile)]
    corpus = write_corpus(str(tmp_path / "c.jsonl"), records)
    out = tmp_path / "o"
    rc, io = _preprocess(capsys, "--input", corpus, "--tokenizer-model", tok, "--output-dir", out, "--workers", 2)
    assert rc == 0, io.err[-2000:]
    manifest = Manifest.load(str(out))
    assert len(manifest.domains) == 5000 and set(hostile) <= set(manifest.domain_names)
    for d in manifest.domains:
        assert os.path.dirname(d.prefix) == str(out) and not os.path.basename(d.prefix).startswith(".")
    assert manifest.verify_shards() is True


def test_token_ids_beyond_the_vocabulary_without_a_record(tmp_path, capsys):
    """--data-path (no manifest, no recorded maximum): the first batch holding such an id stops the
    run with the domain named, not an IndexError inside the embedding."""
    make_corpus(str(tmp_path / "d"), docs_per_domain=20)  # ids up to 255
    prefix = str(tmp_path / "d" / "noise_text_document")
    rc = cli_main(["train", "--data-path", "1", prefix, "--vocab-size", "128", "--eod-id", "0", *TINY_MODEL,
                   "--make-vocab-size-divisible-by", "64", "--global-batch-size", "8", "--train-iters", "2",
                   "--eval-interval", "0"])
    _one_line_error(capsys.readouterr(), rc, "domain 'noise'", "beyond the vocabulary of 128")


def test_a_worker_dies_with_its_parent_fast(tmp_path):
    """The mechanism on its own, in seconds: a process that called die_with_launcher() (with
    torchrun's environment) is killed by the kernel when its parent is SIGKILLed."""
    psutil = pytest.importorskip("psutil")
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    child = ("import time; from odm_megatron.training.parallel import die_with_launcher; "
             "assert die_with_launcher(); open(%r, 'w').write('ready'); time.sleep(120)" % str(tmp_path / "ready"))
    parent = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', %r]); "
              "print(p.pid, flush=True); time.sleep(120)" % child)
    env = dict(os.environ, TORCHELASTIC_RUN_ID="test", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launcher = subprocess.Popen([sys.executable, "-c", parent], env=env, stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        worker = psutil.Process(int(launcher.stdout.readline()))
        _wait_for(lambda: os.path.exists(tmp_path / "ready"), 60, "the child to tie itself to its parent")
        os.kill(launcher.pid, 9)
        launcher.wait(timeout=10)

        def gone():
            try:
                return worker.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        _wait_for(gone, 10, "the child to die with its parent")
    finally:
        _kill_group(launcher)
