"""One tokenizer interface for preprocessing and training: SentencePiece or HuggingFace.

``load_tokenizer(path)`` picks the backend from the file: a ``tokenizer.json`` (HuggingFace
``tokenizers``, an optional dependency) or anything else as a SentencePiece model. Both give
``encode``/``decode``, ``vocab_size``, the end-of-document id ``eod`` and the model file's
``sha256`` (recorded in the manifest so training can check it uses the same tokenizer).

End of document. SentencePiece models trained here use the ``</s>`` *eos* piece (id 2) as
EOD. It is a control symbol: text that literally contains ``</s>`` is never encoded to it, so a
document cannot fake a document boundary (a user-defined ``<|endoftext|>`` piece could be). For
models trained elsewhere the eos piece is used when defined, else an ``<|endoftext|>`` piece.

``sentencepiece`` and ``tokenizers`` are imported here and nowhere else.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SENTENCEPIECE = "sentencepiece"
HUGGINGFACE = "huggingface"

# Pieces accepted as end-of-document when a model has no eos id, in order of preference.
EOD_PIECES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or unusable (e.g. without an EOD id)."""


def file_sha256(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Tokenizer:
    """Base class: a loaded tokenizer with an end-of-document id.

    Subclasses implement ``encode`` and ``decode``; ``encode_batch`` returns int32 numpy arrays
    because that is what the preprocessing pipeline ships between processes and writes.
    """

    path: str
    type: str
    vocab_size: int
    eod: int
    sha256: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise TokenizerError(f"{self.path}: vocabulary is empty")
        if not 0 <= self.eod < self.vocab_size:
            raise TokenizerError(f"{self.path}: eod id {self.eod} outside vocabulary of {self.vocab_size}")
        if not self.sha256:
            self.sha256 = file_sha256(self.path)

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.asarray(self.encode(t), dtype=np.int32) for t in texts]

    def piece(self, token_id: int) -> str:
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        return self.eod

    def describe(self) -> dict:
        """The manifest's ``tokenizer`` entry."""
        return {
            "path": os.path.abspath(self.path),
            "type": self.type,
            "vocab_size": int(self.vocab_size),
            "eod_id": int(self.eod),
            "eod_piece": self.piece(self.eod),
            "sha256": self.sha256,
        }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; encodes single-threaded (parallelism is the caller's job)."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError, TypeError) as e:
            raise TokenizerError(f"{path}: not a readable SentencePiece model ({_one_line(e)})") from None
        self._sp = sp
        eod = sp.eos_id()
        if eod < 0:
            eod = _first_known_piece(sp.piece_to_id, sp.unk_id(), EOD_PIECES)
        if eod is None or eod < 0:
            raise TokenizerError(
                f"{path}: SentencePiece model defines no end-of-document id (no eos piece, no "
                f"{'/'.join(EOD_PIECES)}); train one with `odm-megatron train-tokenizer`"
            )
        self._batch_kwargs = _probe_batch_kwargs(sp)
        super().__init__(path=path, type=SENTENCEPIECE, vocab_size=int(sp.get_piece_size()), eod=int(eod))

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        if not texts:
            return []
        kwargs = self._batch_kwargs
        if kwargs.get("return_type") == "numpy":
            return self._sp.encode(texts, **kwargs)
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts, **kwargs)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` (needs the optional ``tokenizers`` package)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(
                f"{path}: a HuggingFace tokenizer.json needs the `tokenizers` package "
                "(pip install 'odm-megatron[hf]')"
            ) from None
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise TokenizerError(f"{path}: not a readable HuggingFace tokenizer.json ({_one_line(e)})") from None
        self._tok = tok
        eod = _first_known_piece(tok.token_to_id, None, EOD_PIECES)
        if eod is None:
            raise TokenizerError(f"{path}: tokenizer.json defines none of the end-of-document tokens {EOD_PIECES}")
        super().__init__(path=path, type=HUGGINGFACE, vocab_size=int(tok.get_vocab_size(with_added_tokens=True)),
                         eod=int(eod))

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece model, or a HuggingFace ``*.json`` tokenizer."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer model not found: {path}")
    if path.endswith(".json"):
        return HuggingFaceTokenizer(path)
    return SentencePieceTokenizer(path)


# --------------------------------------------------------------------------- training


@dataclass
class SentencePieceTrainingConfig:
    """Options for :func:`train_sentencepiece`; the defaults suit LLM pretraining.

    Text is kept exactly (identity normalisation, whitespace runs kept) so that code and
    tables survive, and unknown characters fall back to bytes instead of ``<unk>``.
    """

    vocab_size: int
    model_type: str = "bpe"
    character_coverage: float = 0.9999
    max_sentence_length: int = 16384
    split_digits: bool = True
    num_threads: int = 0  # 0: all CPUs
    seed: int = 0
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', not {self.model_type!r}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size {self.vocab_size} too small: byte fallback alone needs 259 ids")
        if not 0 < self.character_coverage <= 1:
            raise ValueError("character_coverage must be in (0, 1]")


def train_sentencepiece(sentences_file: str, output_prefix: str, config: SentencePieceTrainingConfig) -> str:
    """Train on a one-sentence-per-line file; returns the ``.model`` path.

    ids: 0 ``<unk>``, 1 ``<s>``, 2 ``</s>`` (the EOD), no pad. The model is written to a
    temporary prefix first and renamed, so an interrupted run leaves no usable-looking model.
    """
    import sentencepiece as spm

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    options: dict[str, Any] = dict(
        input=sentences_file,
        model_prefix=tmp_prefix,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        byte_fallback=True,
        character_coverage=config.character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=config.split_digits,
        max_sentence_length=config.max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=config.num_threads or (os.cpu_count() or 1),
        minloglevel=0 if config.verbose else 2,
    )
    if config.model_type == "unigram":
        options["hard_vocab_limit"] = False
    if hasattr(spm, "set_random_generator_seed"):  # sentence shuffling, unigram sampling
        spm.set_random_generator_seed(config.seed)
    try:
        spm.SentencePieceTrainer.train(**options)
    except (RuntimeError, OSError) as e:
        _remove_quietly(tmp_prefix + ".model", tmp_prefix + ".vocab")
        raise TokenizerError(f"SentencePiece training failed: {_one_line(e)}") from None
    for ext in (".vocab", ".model"):  # the .model last: it is what marks success
        os.replace(tmp_prefix + ext, output_prefix + ext)
    return output_prefix + ".model"


# --------------------------------------------------------------------------- helpers


def _probe_batch_kwargs(sp: Any) -> dict:
    """Single-threaded batch encoding, as numpy when this sentencepiece can (>= 0.2.1)."""
    for kwargs in ({"num_threads": 1, "return_type": "numpy"}, {"num_threads": 1}, {}):
        try:
            out = sp.encode(["a"], **kwargs)
        except (TypeError, ValueError):
            continue
        if kwargs.get("return_type") == "numpy" and not isinstance(out[0], np.ndarray):
            continue
        return kwargs
    return {}


def _first_known_piece(lookup: Any, unknown: Optional[int], pieces: Iterable[str]) -> Optional[int]:
    for p in pieces:
        token_id = lookup(p)
        if token_id is not None and token_id != unknown and token_id >= 0:
            return int(token_id)
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def _remove_quietly(*paths: str) -> None:
    for p in paths:
        try:
            os.remove(p)
        except OSError:
            pass
