"""Online data mixing in Megatron-LM's own training loop, hooked in at run time (no patch).

- :func:`install`: one call before ``pretrain(...)`` wires every hook (:mod:`.hooks`);
- ``odm-megatron megatron-lm SCRIPT ARGS...`` runs an unmodified ``pretrain_gpt.py`` with it
  (:mod:`.launcher`); ``odm-megatron pretrain-gpt ARGS...`` runs Megatron-LM's GPT pretraining
  from the megatron-core wheel alone, 0.17+ (:mod:`.pretrain_gpt`);
- :mod:`.glue`: the hooks themselves (flags, online train dataset and mixer, batch sampler, loss
  feedback, end of step, bandit state next to each checkpoint);
- :mod:`.adapters`: the one table of what differs between Megatron-LM releases;
- :mod:`.evaluation`: per-domain validation written to ``<save>/odm/eval.jsonl``;
- :mod:`.cpu_standins`: what Megatron-LM's loop needs to run without a GPU (CPU only).

Importing this package imports neither Megatron-LM nor its training code.
"""
from importlib import import_module
from typing import Any

# Imported on first use (PEP 562): the launcher must put the user's Megatron-LM checkout on
# sys.path before anything imports ``megatron``, and importing this package must not do it.
_EXPORTS = {
    "adapters": ("ADAPTERS", "Adapter", "UnsupportedMegatronError", "detect", "supported_versions"),
    "glue": ("ODM_STATE_DIR", "DatasetIdTap", "OdmCheckpointError", "OdmConfigError", "OdmRuntime", "add_odm_args",
             "build_odm_dataloader", "build_odm_sampler", "build_odm_train_dataset", "check_odm_args",
             "dataset_id_of", "domain_names_for", "get_mixer", "get_runtime", "is_enabled", "odm_dataset_sizes",
             "odm_loss_hook", "odm_save_state", "odm_step_end", "reset", "resolve_prior", "state_path", "tap",
             "total_train_samples", "train_blend", "with_odm_args"),
    "hooks": ("install", "uninstall", "wrap_dataset_provider", "wrap_forward_step"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
