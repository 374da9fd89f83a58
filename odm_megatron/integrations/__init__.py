"""Thin glue between the online-mixing core and training frameworks.

- :mod:`.megatron_lm`: hooked into Megatron-LM's own training loop at run time, no patch
  (``install()``, the ``odm-megatron megatron-lm`` / ``pretrain-gpt`` launchers: flags, train
  dataset + mixer, sampler, loss hook, step hook, bandit state next to the checkpoint);
- :mod:`.deepspeed`: keep the bandit state in DeepSpeed checkpoints, build the data loader from a
  DeepSpeed engine, keep the mixer's step counter in line with the engine's.

Nothing here changes the core's behaviour; each function is a few lines over the public API of
:class:`~odm_megatron.mixer.OnlineMixer`, :class:`~odm_megatron.sampler.OnlineMixingBatchSampler`
and :class:`~odm_megatron.dataset.OnlineBlendedDataset`. The framework itself is imported lazily,
so importing these modules never requires Megatron-LM or DeepSpeed.
"""
