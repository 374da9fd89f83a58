"""Preprocessing: Pile-format jsonl(.zst/.gz) into per-domain Megatron indexed datasets.

One module per job:

- :mod:`~odm_megatron.preprocess.readers`   stream lines out of .jsonl / .jsonl.zst / .jsonl.gz,
  noticing truncated or corrupt streams
- :mod:`~odm_megatron.preprocess.documents` turn raw lines into (domain, text), counting bad ones
- :mod:`~odm_megatron.preprocess.domains`   dotted domain keys and safe file names
- :mod:`~odm_megatron.preprocess.skips`     the record of skipped lines, by reason
- :mod:`~odm_megatron.preprocess.worker`    parse + tokenize one batch (runs in worker processes)
- :mod:`~odm_megatron.preprocess.pipeline`  ordered multi-process tokenization, end to end
- :mod:`~odm_megatron.preprocess.writer`    per-domain ``IndexedDatasetBuilder`` under temporary names
- :mod:`~odm_megatron.preprocess.manifest_writer` the ``manifest.json`` that training reads
- :mod:`~odm_megatron.preprocess.sampling`  a byte budget drawn evenly across domains (tokenizer training)
- :mod:`~odm_megatron.preprocess.fixtures`  small synthetic Pile-format corpora for tests

Nothing here imports megatron-core or torch at module level except :mod:`writer`, so worker
processes start fast.
"""
