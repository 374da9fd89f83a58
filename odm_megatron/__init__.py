"""Online Data Mixing (ODM) for megatron-core pretraining.

The library is layered, from pure math to framework glue:

- :mod:`odm_megatron.policy`    bandit policies (numpy, float64, no torch.distributed)
- :mod:`odm_megatron.sampling`  the pure function from (seed, global sample, weights) to a domain
- :mod:`odm_megatron.dataset`   per-domain megatron-core GPTDatasets behind one online dataset
- :mod:`odm_megatron.feedback`  per-domain loss accumulation on the device
- :mod:`odm_megatron.distributed` the one place where ranks talk to each other
- :mod:`odm_megatron.schedule`  the lagged weight schedule (which weights sample each step)
- :mod:`odm_megatron.stream`    domain cursors and the steps the data loader has drawn ahead
- :mod:`odm_megatron.window`    the losses since the last update and the all-reduce that closes it
- :mod:`odm_megatron.mixer`     the coordinator: policy + schedule + stream + window + state
- :mod:`odm_megatron.sampler`   a Megatron-style batch sampler over the mixer
- :mod:`odm_megatron.state`     the versioned, file-backed bandit state
"""

__version__ = "0.1.0"

from odm_megatron import _quiet

_quiet.install()  # before any megatron-core import: drop its Transformer Engine / Apex / FSDP chatter
