"""``odm-megatron train``: megatron-core GPT pretraining with online data mixing.

One job per module:

- :mod:`.arguments`   Megatron-named flags and their validation (clear one-line errors)
- :mod:`.cpu_shims`   the only CPU workarounds for megatron-core (applied only without a GPU)
- :mod:`.parallel`    process group + megatron-core model-parallel groups, seeding
- :mod:`.model`       GPTModel from the local layer spec
- :mod:`.optim`       AdamW, LR schedule, gradient all-reduce and clipping
- :mod:`.data`        train/validation data from a manifest or ``--data-path``
- :mod:`.evaluate`    per-domain validation loss/perplexity on fixed windows
- :mod:`.checkpoint`  atomic save, resume from the latest complete checkpoint
- :mod:`.metrics`     JSONL logs, console lines, TensorBoard
- :mod:`.train`       the loop
- :mod:`.cli`         ``add_arguments`` / ``main``
- :mod:`.plot`        ``odm-megatron plot``
"""
# megatron-core's start-up warnings about Transformer Engine / Apex are dropped by odm_megatron._quiet.
