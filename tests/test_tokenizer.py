"""train-tokenizer and load_tokenizer: byte fallback, EOD id, domain-balanced sample, errors."""
from __future__ import annotations

import json
import os

import pytest

from odm_megatron.cli import main as cli_main
from odm_megatron.preprocess.fixtures import make_documents, write_corpus
from odm_megatron.preprocess.sampling import BalancedSampler, split_units, water_level
from odm_megatron.tokenizer import TokenizerError, file_sha256, load_tokenizer

from fixtures_corpus import VOCAB, train_test_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tok"))
    records = make_documents(seed=1)
    return train_test_tokenizer(workdir, records), records


def test_trained_model_has_vocab_eod_and_record(trained):
    model, _ = trained
    tok = load_tokenizer(model)
    assert tok.type == "sentencepiece"
    assert tok.vocab_size == VOCAB
    assert tok.eod == 2 and tok.piece(tok.eod) == "</s>"
    assert tok.sha256 == file_sha256(model)
    record = json.load(open(model[: -len(".model")] + ".json"))
    assert set(record["domains"]) == {"Pile-CC", "Wikipedia (en)", "DM Mathematics", "Github", "Enron Emails"}
    assert record["eod_piece"] == "</s>"
    assert not os.path.exists(model + ".tmp")
    assert not [n for n in os.listdir(os.path.dirname(model)) if n.startswith(".sample-")]


def test_byte_fallback_round_trips_unseen_text(trained):
    tok = load_tokenizer(trained[0])
    text = "def f():\n    return 'Ωmega ☃ 😀'  # never seen\ttabs\n\n  two  spaces"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 0 not in ids  # no <unk>: unknown characters fall back to bytes
    assert tok.eod not in ids


def test_literal_eod_text_is_not_the_eod_id(trained):
    tok = load_tokenizer(trained[0])
    assert tok.eod not in tok.encode("end </s> of text <|endoftext|>")


def test_encode_batch_matches_encode(trained):
    tok = load_tokenizer(trained[0])
    texts = ["the city river", "solve 17 + 42", "", "東京 🙂"]
    batch = tok.encode_batch(texts)
    assert [b.tolist() for b in batch] == [tok.encode(t) for t in texts]
    assert all(b.dtype.name == "int32" for b in batch)


def test_unigram_trains(tmp_path):
    model = train_test_tokenizer(str(tmp_path), make_documents(seed=2), model_type="unigram")
    tok = load_tokenizer(model)
    assert tok.eod == 2 and 300 <= tok.vocab_size <= VOCAB
    assert tok.decode(tok.encode("the history of 東京")) == "the history of 東京"


def test_water_level():
    assert water_level([10, 10], 100) == float("inf")
    assert water_level([100, 100], 100) == 50
    assert water_level([10, 1000, 1000], 110) == 50  # the small domain is taken whole
    assert water_level([0, 300], 100) == 100


def test_sampler_keeps_small_domain_whole_and_splits_the_rest_evenly():
    sampler = BalancedSampler(budget_bytes=30_000, seed=0, unit_bytes=100)
    line = "x" * 99 + "\n"
    for i in range(400):  # big: 400 x 100 bytes; medium: 200 x 100; small: 20 x 100
        sampler.add("big", line * 1)
        if i % 2 == 0:
            sampler.add("medium", line)
        if i % 20 == 0:
            sampler.add("small", line)
    sample = sampler.sample()
    kept = {d: sum(len(u) for u in units) for d, units in sample.items()}
    assert kept["small"] == 2_000  # whole
    assert abs(kept["big"] - 14_000) <= 100 and abs(kept["medium"] - 14_000) <= 100
    assert sampler.seen == {"big": 40_000, "medium": 20_000, "small": 2_000}


def test_sampler_is_reproducible():
    def run(seed):
        s = BalancedSampler(budget_bytes=2_000, seed=seed, unit_bytes=50)
        for i in range(200):
            s.add("a" if i % 3 else "b", f"document {i}\n" * 3)
        return s.sample()

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_split_units_cuts_at_newlines_and_loses_nothing():
    text = "line one\nline two\n" * 50 + "tail without newline"
    units = list(split_units(text, 64))
    assert "".join(units) == text
    assert all(u.endswith("\n") for u in units[:-1])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(str(bad))


def test_model_without_eod_is_refused(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(d["text"] for d in make_documents(seed=3)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "noeos"), vocab_size=300,
                                   eos_id=-1, minloglevel=2, byte_fallback=True)
    with pytest.raises(TokenizerError, match="no end-of-document id"):
        load_tokenizer(str(tmp_path / "noeos.model"))


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    rc = cli_main(["train-tokenizer", "--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "400",
                   "--output", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "input not found" in err and "Traceback" not in err
    corpus = write_corpus(str(tmp_path / "c.jsonl"), make_documents(seed=4))
    rc = cli_main(["train-tokenizer", "--input", corpus, "--vocab-size", "100", "--output", str(tmp_path / "t")])
    assert rc == 2 and "too small" in capsys.readouterr().err
    rc = cli_main(["train-tokenizer", "--input", corpus, "--vocab-size", "400", "--domain-key", "meta.nothing",
                   "--output", str(tmp_path / "t")])
    assert rc == 2 and "missing_domain" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t.model")


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train-tokenizer", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--input", "--vocab-size", "--model-type", "--output", "--sample-bytes", "--domain-key", "--seed"):
        assert flag in out
    assert "evenly across domains" in out


def test_huggingface_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator([d["text"] for d in make_documents(seed=5)], trainer=trainer)
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)
    tok = load_tokenizer(path)
    assert tok.type == "huggingface" and tok.eod == 1 and tok.vocab_size == hf.get_vocab_size()
    assert [a.tolist() for a in tok.encode_batch(["the city", "x"])] == [tok.encode("the city"), tok.encode("x")]
    assert tok.describe()["sha256"] == file_sha256(path)
