"""A real 2-process DeepSpeed run (CPU, gloo) with online mixing through
``odm_megatron.integrations.deepspeed``: both ranks hold identical weights at every update, and
save at step n -> fresh engine and mixer -> load -> continue reproduces the uninterrupted run's
sample stream, mixture weights and losses bit for bit.

One spawn does every check: importing DeepSpeed costs seconds per process.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

# Checked without importing: only the spawned ranks import DeepSpeed (seconds each).
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed", allow_module_level=True)

from core_fixtures import EOD, VOCAB_SIZE, make_domains  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

SEQ, GBS, MBS, WORLD = 16, 8, 2, 2  # 2 micro-batches per rank per step: gradient accumulation 2
STEPS, SAVE_AT = 8, 5  # SAVE_AT is mid-window (update_interval 2): the partial window must survive
NAMES = ["web", "code", "books"]
DS_CONFIG = {
    "train_batch_size": GBS,
    "train_micro_batch_size_per_gpu": MBS,
    "gradient_accumulation_steps": GBS // (MBS * WORLD),
    "steps_per_print": 10**9,
    "zero_optimization": {"stage": 0},
}


class TinyLM(torch.nn.Module):
    """Embedding + LM head; returns per-token cross entropy [b, s] (reduction="none")."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB_SIZE, 16)
        self.head = torch.nn.Linear(16, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.embed(tokens))
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")


def _deepspeed_cpu_setup(rank: int) -> None:
    """DeepSpeed 0.19 on CPU with gloo: test-only workarounds, nothing of this is in the glue.

    - LOCAL_RANK is read by DeepSpeed's engine; dist_utils sets RANK/WORLD_SIZE/MASTER_* only;
    - the shared-memory all-reduce op (``deepspeed_shm_comm``) is not built in this install and
      would be JIT-compiled by ``init_distributed`` on the CPU accelerator: mark it unavailable.
    """
    os.environ["LOCAL_RANK"] = str(rank)
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(WORLD))
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def _worker(rank, world_size, prefixes, workdir):
    torch.set_num_threads(1)
    _deepspeed_cpu_setup(rank)
    import deepspeed as ds

    from odm_megatron.dataset import OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, make_gpt_dataset_config
    from odm_megatron.integrations import deepspeed as odm_ds
    from odm_megatron.mixer import MixerConfig, OnlineMixer
    from odm_megatron.state import BanditStateError

    cfg = make_gpt_dataset_config(7, SEQ, TokenizerSpec(VOCAB_SIZE, EOD), path_to_cache=os.path.join(workdir, "cache"))
    dataset = OnlineBlendedDataset(build_domain_datasets(prefixes, cfg, domain_names=NAMES), seed=7, domain_names=NAMES)

    def new_run(init_seed, mixer_seed=7):
        torch.manual_seed(init_seed)  # a different init on resume: only the checkpoint can make it match
        model = TinyLM()
        engine, *_ = ds.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-2),
                                   config=DS_CONFIG)
        mixer = OnlineMixer(
            MixerConfig(NAMES, seed=mixer_seed, global_batch_size=engine.train_batch_size(), update_interval=2,
                        lag=1, policy="odm-exp3"),
            prior=np.full(len(NAMES), 1 / len(NAMES)), num_samples_per_domain=dataset.num_samples_per_domain)
        return engine, mixer

    def train(engine, mixer, until, ckpt=None, save_at=None):
        loader = odm_ds.build_dataloader(dataset, mixer, engine, total_samples=STEPS * GBS)
        out = {"samples": [], "losses": [], "weights": {}, "updates": [], "global": {}}
        for batch in loader:
            step = mixer.completed_steps
            if step not in out["global"]:  # the whole global batch this step draws, every rank's part
                domains, positions = mixer.draw_global_batch(step)
                out["global"][step] = [(d, dataset[(d, p)]["tokens"].tolist())
                                       for d, p in zip(domains.tolist(), positions.tolist())]
            per_token = engine(batch["tokens"], batch["labels"])
            mixer.accumulate(per_token, batch["loss_mask"], batch["dataset_id"])
            mask = batch["loss_mask"]
            loss = (per_token * mask).sum() / mask.sum()
            engine.backward(loss)
            engine.step()
            out["samples"].append((step, batch["dataset_id"].tolist(), batch["tokens"].tolist()))
            out["losses"].append((step, loss.item()))
            record = odm_ds.step_end(engine, mixer)
            if record is not None:
                out["updates"].append((record.step, record.weights.tolist()))
            if mixer.completed_steps > step:
                out["weights"][step] = mixer.weights_for_step(step).tolist()
                if mixer.completed_steps == save_at:
                    odm_ds.save_checkpoint(engine, ckpt, mixer, client_state={"note": "mine"})
            if mixer.completed_steps == until:
                break
        return out

    ckpt = os.path.join(workdir, "ckpt")
    result = {}
    engine, mixer = new_run(init_seed=1)
    result["full"] = train(engine, mixer, STEPS, ckpt=ckpt, save_at=SAVE_AT)
    result["full_state"] = mixer.state_dict()

    engine, mixer = new_run(init_seed=2)
    path, client_state = odm_ds.load_checkpoint(engine, ckpt, mixer)
    result["resumed_at"] = (mixer.completed_steps, engine.global_steps, client_state.get("note"),
                            odm_ds.ODM_CLIENT_STATE_KEY in client_state)
    result["resumed"] = train(engine, mixer, STEPS)
    result["resumed_state"] = mixer.state_dict()

    # Error paths, on the same warm processes.
    engine, mixer = new_run(init_seed=3)
    result["no_checkpoint"] = odm_ds.load_checkpoint(engine, os.path.join(workdir, "empty"), mixer)
    engine, mixer = new_run(init_seed=3, mixer_seed=8)
    try:
        odm_ds.load_checkpoint(engine, ckpt, mixer)
        result["other_seed"] = None
    except BanditStateError as e:
        result["other_seed"] = str(e)
    engine, mixer = new_run(init_seed=3)
    engine.save_checkpoint(os.path.join(workdir, "plain"), tag="plain")  # without the glue: no bandit state
    try:
        odm_ds.load_checkpoint(engine, os.path.join(workdir, "plain"), mixer, tag="plain")
        result["plain"] = None
    except odm_ds.OdmCheckpointError as e:
        result["plain"] = str(e)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ds"))
    prefixes = make_domains(os.path.join(workdir), [30, 20, 50], doc_len=40, seed=3)
    return run_distributed(_worker, WORLD, prefixes, workdir)


def test_ranks_hold_identical_weights_at_every_update(runs):
    a, b = runs
    assert len(a["full"]["updates"]) == STEPS // 2
    assert a["full"]["updates"] == b["full"]["updates"]
    assert a["full"]["weights"] == b["full"]["weights"]
    assert a["full_state"] == b["full_state"]
    final = np.array(a["full"]["updates"][-1][1])
    assert not np.allclose(final, 1 / len(NAMES)), "the bandit should have moved the weights"


def test_ranks_consume_disjoint_halves_of_each_global_batch(runs):
    a, b = runs
    for step in range(STEPS):
        def consumed(run):  # (domain, tokens) of each sample the rank trained on at this step
            return [(d, toks) for s, ids, batch in run["full"]["samples"] if s == step
                    for d, toks in zip(ids, batch)]

        sa, sb = consumed(a), consumed(b)
        whole = a["full"]["global"][step]
        assert whole == b["full"]["global"][step]
        assert len(whole) == GBS and len({repr(x) for x in whole}) == GBS  # GBS distinct samples
        assert len(sa) == len(sb) == GBS // WORLD
        assert not {repr(x) for x in sa} & {repr(x) for x in sb}, f"step {step}: a sample on both ranks"
        assert sorted(sa + sb) == sorted(whole), f"step {step}: the halves are not the global batch"


def test_resume_reproduces_the_uninterrupted_run(runs):
    for rank, r in enumerate(runs):
        assert r["resumed_at"] == (SAVE_AT, SAVE_AT, "mine", False), rank
        full, resumed = r["full"], r["resumed"]
        tail = lambda seq: [x for x in seq if x[0] >= SAVE_AT]  # noqa: E731
        assert resumed["samples"] == tail(full["samples"]), f"rank {rank}: sample stream differs"
        assert resumed["updates"] == tail(full["updates"]), f"rank {rank}: weights differ"
        assert resumed["weights"] == {s: w for s, w in full["weights"].items() if s >= SAVE_AT}
        # Same samples, same restored model/optimizer, same gloo reduction order: bit-identical.
        assert resumed["losses"] == tail(full["losses"]), f"rank {rank}: losses differ"
        assert r["resumed_state"] == r["full_state"]


def test_error_paths(runs):
    for r in runs:
        assert r["no_checkpoint"] == (None, None)
        assert r["other_seed"] is not None and "seed" in r["other_seed"]
        assert r["plain"] is not None and "no bandit state" in r["plain"]
