#!/usr/bin/env python
"""What does online mixing cost? Measurements against megatron-core's BlendedDataset, as JSON figures.

The measurement half (``overhead_report.py`` derives the fractions, compares them with the
targets and writes the markdown). Every time is a median of repeated measurements; ratios are
taken against a baseline measured in the same run, interleaved with it where that is possible:

1. data path: samples through ``OnlineMixingBatchSampler`` + ``OnlineBlendedDataset`` (with
   ``mixer.step_end`` per step) and through megatron-core's ``BlendedDataset`` in Megatron's
   order, over the same 22 per-domain GPTDatasets; plain loop, DataLoader (num_workers=0), and
   the index alone (items that cost nothing);
2. feedback: ``mixer.accumulate`` per micro-batch and ``mixer.step_end`` on an update step, for
   K = 22 and 1000 domains (one process, and a 2-process gloo group), beside the forward+backward
   time of the trainer's own model (``odm_megatron.training.model.build_model``);
3. index: bytes and build time of BlendedDataset's index for two horizons, and the online mixer's
   and dataset's bytes after the same numbers of simulated steps.

Two clocks: ``cpu`` (CPU time of the measuring thread, torch on one thread: the work done, not
the time other jobs held the cores) and ``wall`` (wall clock, default torch threads).

    python benchmarks/overhead.py                            # full run, writes docs/benchmarks/
    python benchmarks/overhead.py --smoke --output /tmp/x    # a few seconds, for tests
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import overhead_report as report  # noqa: E402

# The Pile's 22 domains with their raw sizes in GiB (Gao et al., 2020, table 1): names and relative sizes only.
PILE_DOMAINS = [
    ("Pile-CC", 227.12), ("PubMed Central", 90.27), ("Books3", 100.96), ("OpenWebText2", 62.77),
    ("ArXiv", 56.21), ("Github", 95.16), ("FreeLaw", 51.15), ("StackExchange", 32.20),
    ("USPTO Backgrounds", 22.90), ("PubMed Abstracts", 19.26), ("Gutenberg (PG-19)", 10.88),
    ("OpenSubtitles", 12.98), ("Wikipedia (en)", 6.38), ("DM Mathematics", 7.75), ("Ubuntu IRC", 5.52),
    ("BookCorpus2", 6.30), ("EuroParl", 4.59), ("HackerNews", 3.90), ("YoutubeSubtitles", 3.73),
    ("PhilPapers", 2.38), ("NIH ExPorter", 1.89), ("Enron Emails", 0.88),
]
PILE_TOKENS = 300e9  # assumed tokens in one epoch of The Pile (sizes the simulated domains)
VOCAB_SIZE, EOD, SEED, UPDATE_INTERVAL, LAG = 8192, 0, 1234, 10, 2
KS = (22, 1000)
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}

logger = logging.getLogger("overhead")


@dataclass(frozen=True)
class Settings:
    mode: str
    data_seq: int
    data_gbs: int
    data_mbs: int
    data_steps: int
    data_reps: int
    loader_reps: int
    samples_per_domain: Tuple[int, int]  # one-epoch samples of the 22 synthetic domains (min, max)
    layers: int
    hidden: int
    heads: int
    seq: int
    micro_batch: int
    vocab: int
    model_reps: int
    acc_reps: int
    update_reps: int
    gloo: bool
    horizons: Tuple[int, int]  # steps
    horizon_gbs: int
    horizon_seq: int


FULL = Settings("full", data_seq=256, data_gbs=480, data_mbs=8, data_steps=10, data_reps=9, loader_reps=5,
                samples_per_domain=(500, 1500), layers=4, hidden=256, heads=4, seq=256, micro_batch=8,
                vocab=VOCAB_SIZE, model_reps=7, acc_reps=300, update_reps=40, gloo=True,
                horizons=(10_000, 100_000), horizon_gbs=480, horizon_seq=2048)
SMOKE = Settings("smoke", data_seq=32, data_gbs=16, data_mbs=4, data_steps=2, data_reps=1, loader_reps=1,
                 samples_per_domain=(20, 40), layers=1, hidden=32, heads=2, seq=32, micro_batch=2, vocab=512,
                 model_reps=1, acc_reps=3, update_reps=2, gloo=False, horizons=(10, 100), horizon_gbs=480,
                 horizon_seq=2048)


# -- helpers ------------------------------------------------------------------------------
def summary(samples: Sequence[float]) -> Dict[str, float]:
    s = sorted(samples)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s)}


def time_calls(fn: Callable[[], Any], reps: int, clock: Callable[[], float], warmup: int = 2) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = clock()
        fn()
        samples.append(clock() - t0)
    return summary(samples)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread, so the thread's CPU time holds all of an operation's work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def clock_context(clock: str):
    return one_thread() if clock == "cpu" else contextlib.nullcontext()


def deep_bytes(obj: Any, seen: Optional[set] = None) -> int:
    """Bytes held by ``obj``: array payloads plus Python objects, through containers and
    instance ``__dict__``s, each object once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):  # __sizeof__ includes the buffer when the array owns it
        return sys.getsizeof(obj) + (0 if obj.flags.owndata or obj.base is None else deep_bytes(obj.base, seen))
    if torch.is_tensor(obj):
        return obj.element_size() * obj.numel() + sys.getsizeof(obj)
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_bytes(k, seen) + deep_bytes(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(deep_bytes(x, seen) for x in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        size += deep_bytes(vars(obj), seen)
    return size


def loadavg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def machine_info() -> Dict[str, Any]:
    import megatron.core

    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch": torch.__version__,
            "megatron_core": megatron.core.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


class StubDataset:
    """A sized dataset whose items cost nothing: isolates the index and sampler."""

    def __init__(self, n: int) -> None:
        self.n, self.item = n, {"tokens": torch.zeros(1, dtype=torch.long)}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.item


def make_mixer(names: Sequence[str], prior: np.ndarray, samples: np.ndarray, gbs: int):
    from odm_megatron.mixer import MixerConfig, OnlineMixer

    return OnlineMixer(MixerConfig(domain_names=list(names), seed=SEED, global_batch_size=gbs,
                                   update_interval=UPDATE_INTERVAL, lag=LAG, policy="odm-exp3"),
                       prior=prior, num_samples_per_domain=samples)


# -- 1. data path -------------------------------------------------------------------------
def write_domains(directory: str, samples_per_domain: Sequence[int], seq: int) -> List[str]:
    """One indexed dataset per domain, about ``samples_per_domain[d]`` samples of ``seq`` tokens
    (documents of 50..1000 random tokens ending in EOD)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    prefixes = []
    for d, n in enumerate(samples_per_domain):
        prefix = os.path.join(directory, f"domain{d:02d}_text_document")
        builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
        written, target = 0, n * (seq + 1) + seq + 2
        while written < target:
            doc = np.append(rng.integers(1, VOCAB_SIZE, size=int(rng.integers(50, 1000))), EOD)
            builder.add_item(torch.from_numpy(doc.astype(np.int64)))
            builder.end_document()
            written += doc.size
        builder.finalize(get_idx_path(prefix))
        prefixes.append(prefix)
    return prefixes


def paired(make: Dict[str, Callable[[], Iterator[Tuple[float, float]]]], steps: int, reps: int) -> Dict[str, Any]:
    """``reps`` passes of ``steps`` steps of two sides (generators yielding (wall, cpu) seconds per
    step), alternating step by step (who goes first alternating too), so a load spike hits both.
    Per side and clock: the total of each pass."""
    for _ in zip(*(m() for m in make.values())):  # warm-up pass: page cache, first touch of the mmaps
        pass
    totals = {side: {"wall": [], "cpu": []} for side in make}
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            gens = {side: m() for side, m in make.items()}
            tot = {side: np.zeros(2) for side in make}
            for step in range(steps):
                for side in (list(make) if (step + r) % 2 == 0 else list(make)[::-1]):
                    tot[side] += next(gens[side])
            for side in make:
                totals[side]["wall"].append(float(tot[side][0]))
                totals[side]["cpu"].append(float(tot[side][1]))
            gc.collect()
    finally:
        if gc_enabled:
            gc.enable()
    return totals


def bench_data_path(st: Settings, workdir: str) -> Dict[str, Any]:
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from torch.utils.data import DataLoader

    from odm_megatron.dataset import OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, make_gpt_dataset_config
    from odm_megatron.sampler import OnlineMixingBatchSampler

    names = [n for n, _ in PILE_DOMAINS]
    sizes = np.linspace(st.samples_per_domain[1], st.samples_per_domain[0], len(names)).round().astype(int)
    prefixes = write_domains(os.path.join(workdir, "data"), sizes, st.data_seq)
    cfg = make_gpt_dataset_config(seed=SEED, seq_length=st.data_seq, tokenizer=TokenizerSpec(VOCAB_SIZE, EOD),
                                  path_to_cache=os.path.join(workdir, "cache"))
    datasets = build_domain_datasets(prefixes, cfg, domain_names=names)
    lengths = np.array([len(d) for d in datasets], dtype=np.int64)
    prior = lengths / lengths.sum()  # the natural blend, for both sides
    gbs, mbs, n_samples = st.data_gbs, st.data_mbs, st.data_steps * st.data_gbs
    blended = BlendedDataset(datasets, prior.tolist(), n_samples, cfg)
    counts = np.bincount(blended.dataset_index, minlength=len(names))
    if np.any(counts > lengths):
        raise RuntimeError("overhead: BlendedDataset would oversample a domain; raise samples_per_domain")

    def online(dsets, loader: bool):
        ds = OnlineBlendedDataset(dsets, seed=SEED, domain_names=names)
        mixer = make_mixer(names, prior, ds.num_samples_per_domain, gbs)
        sampler = OnlineMixingBatchSampler(mixer, total_samples=n_samples, consumed_samples=0, micro_batch_size=mbs,
                                           data_parallel_rank=0, data_parallel_size=1)
        it = iter(DataLoader(ds, batch_sampler=sampler, num_workers=0)) if loader else iter(sampler)
        for step in range(st.data_steps):
            t, c = time.perf_counter(), time.thread_time()
            for _ in range(sampler.num_microbatches):
                batch = next(it)
                if not loader:
                    for key in batch:
                        ds[key]
            mixer.step_end(step)
            yield time.perf_counter() - t, time.thread_time() - c

    def megatron(bd, loader: bool):
        # MegatronPretrainingSampler's order on one data-parallel rank: consecutive indices
        it = iter(DataLoader(bd, batch_size=mbs, shuffle=False, drop_last=True, num_workers=0)) if loader else None
        for step in range(st.data_steps):
            t, c = time.perf_counter(), time.thread_time()
            if loader:
                for _ in range(gbs // mbs):
                    next(it)
            else:
                for i in range(step * gbs, (step + 1) * gbs):
                    bd[i]
            yield time.perf_counter() - t, time.thread_time() - c

    plain = paired({"online": lambda: online(datasets, False), "blended": lambda: megatron(blended, False)},
                   st.data_steps, st.data_reps)
    loader = paired({"online": lambda: online(datasets, True), "blended": lambda: megatron(blended, True)},
                    st.data_steps, st.loader_reps)
    stubs = [StubDataset(int(n)) for n in lengths]
    real, blended.datasets = blended.datasets, stubs
    try:  # the index alone: the same loops over items that cost nothing
        index_only = paired({"online": lambda: online(stubs, False), "blended": lambda: megatron(blended, False)},
                            st.data_steps, st.data_reps)
    finally:
        blended.datasets = real
    logger.info("data path measured: %d samples per pass", n_samples)
    return {"num_domains": len(names), "seq_length": st.data_seq, "global_batch_size": gbs, "micro_batch_size": mbs,
            "steps": st.data_steps, "samples": n_samples, "samples_per_domain": lengths.tolist(),
            "policy": "odm-exp3", "update_interval": UPDATE_INTERVAL,
            "plain_loop_s": plain, "dataloader_s": loader, "index_only_s": index_only}


# -- 2. model and feedback ----------------------------------------------------------------
def build_trainer_model(st: Settings, env) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The trainer's model (``odm_megatron.training.model.build_model``) from its own flags."""
    from odm_megatron.training.arguments import add_arguments
    from odm_megatron.training.model import build_model

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--num-layers", str(st.layers), "--hidden-size", str(st.hidden),
                              "--num-attention-heads", str(st.heads), "--seq-length", str(st.seq)])
    # the two defaults validate_args fills from other flags
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * st.hidden
    args.max_position_embeddings = args.max_position_embeddings or st.seq
    model = build_model(args, env, st.vocab)
    desc = {"builder": "odm_megatron.training.model.build_model", "position_embedding_type": args.position_embedding_type,
            "tied_embeddings": not args.untie_embeddings_and_output_weights,
            "padded_vocab": int(model.shared_embedding_or_output_weight().shape[0])}
    return model, desc


def bench_model(st: Settings, env) -> Tuple[Dict[str, Any], torch.Tensor]:
    from odm_megatron.training.model import gpt_forward

    torch.manual_seed(SEED)
    model, desc = build_trainer_model(st, env)
    model.train()
    g = torch.Generator().manual_seed(0)
    b, s = st.micro_batch, st.seq
    batch = {"tokens": torch.randint(1, st.vocab, (b, s), generator=g),
             "labels": torch.randint(1, st.vocab, (b, s), generator=g),
             "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous()}
    out = {}

    def step():
        model.zero_grad(set_to_none=True)
        per_token = gpt_forward(model, batch, bf16=False)
        per_token.mean().backward()
        out["per_token"] = per_token.detach()

    fwd_bwd = {}
    for clock in CLOCKS:
        with clock_context(clock):
            fwd_bwd[clock] = time_calls(step, st.model_reps, CLOCKS[clock])
    res = {**desc, "params": sum(p.numel() for p in model.parameters()), "layers": st.layers, "hidden": st.hidden,
           "heads": st.heads, "seq_length": s, "micro_batch_size": b, "vocab_size": st.vocab, "fwd_bwd_s": fwd_bwd}
    logger.info("model: %.1fM parameters, fwd+bwd %.0f ms cpu", res["params"] / 1e6, 1e3 * fwd_bwd["cpu"]["median"])
    return res, out["per_token"]


def bench_feedback(st: Settings, per_token_loss: torch.Tensor) -> Dict[str, Any]:
    """Per K and clock: accumulate at the small model's micro-batch and at the 1B micro-batch
    shape, and step_end on update steps (one process: the all-reduce is a no-op)."""
    b, s = per_token_loss.shape
    big_b, big_s = report.ONE_B["micro_batch"], report.ONE_B["seq"]
    res: Dict[str, Any] = {}
    for k in KS:
        names = [f"d{i}" for i in range(k)]
        g = torch.Generator().manual_seed(k)
        ids, mask = torch.randint(0, k, (b,), generator=g), torch.ones(b, s)
        big = (torch.rand(big_b, big_s, generator=g) * 4 + 1, torch.ones(big_b, big_s), torch.randint(0, k, (big_b,), generator=g))
        entry: Dict[str, Any] = {"accumulate_shape": [b, s], "accumulate_1b_shape": [big_b, big_s]}
        for clock_name, clock in CLOCKS.items():
            timing = make_mixer(names, np.full(k, 1.0 / k), np.full(k, 10**6), st.data_gbs)
            fresh = make_mixer(names, np.full(k, 1.0 / k), np.full(k, 10**6), st.data_gbs)
            with clock_context(clock_name):
                acc = time_calls(lambda: timing.accumulate(per_token_loss, mask, ids), st.acc_reps, clock)
                acc_big = time_calls(lambda: timing.accumulate(*big), max(3, st.acc_reps // 5), clock)
                update = []
                for step in range(st.update_reps * UPDATE_INTERVAL):
                    fresh.global_batch(step)  # the loader's work, not timed
                    fresh.accumulate(per_token_loss, mask, ids)
                    t = clock()
                    record = fresh.step_end(step)
                    if record is not None:
                        update.append(clock() - t)
            entry[clock_name] = {"accumulate_s": acc, "accumulate_1b_shape_s": acc_big,
                                 "step_end_update_s": summary(update)}
        res[str(k)] = entry
    logger.info("feedback measured for K = %s", list(KS))
    return res


def _gloo_worker(rank: int, world_size: int, store: str, out_path: str, reps: int, gbs: int) -> None:
    import torch.distributed as dist

    from odm_megatron.feedback import DomainLossAccumulator

    torch.set_num_threads(1)
    # a file store: no TCP port to pick
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result = {}
        for k in KS:
            mixer = make_mixer([f"d{i}" for i in range(k)], np.full(k, 1.0 / k), np.full(k, 10**6), gbs)
            g = torch.Generator().manual_seed(k * 10 + rank)
            loss, mask, ids = torch.rand(8, 256, generator=g) + 2, torch.ones(8, 256), torch.randint(0, k, (8,), generator=g)
            buf = torch.zeros_like(DomainLossAccumulator(k, "cpu").stats)  # the statistics the update all-reduces
            raw = []
            for i in range(reps + 3):
                dist.barrier()
                t = time.perf_counter()
                dist.all_reduce(buf)
                if i >= 3:
                    raw.append(time.perf_counter() - t)
            update, weights = [], None
            for step in range(reps * UPDATE_INTERVAL):
                mixer.global_batch(step)
                mixer.accumulate(loss, mask, ids)
                if (step + 1) % UPDATE_INTERVAL == 0:
                    dist.barrier()  # time the update, not the other rank's lateness
                t = time.perf_counter()
                record = mixer.step_end(step)
                if record is not None:
                    update.append(time.perf_counter() - t)
                    weights = record.weights
            result[str(k)] = {"step_end_update_s": summary(update), "all_reduce_stats_s": summary(raw),
                              "stats_shape": list(buf.shape), "stats_dtype": str(buf.dtype).replace("torch.", ""),
                              "final_weights": [float(w) for w in weights]}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, result)
        if rank == 0:
            with open(out_path, "w", encoding="utf-8") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


def bench_gloo(st: Settings, workdir: str) -> Dict[str, Any]:
    import torch.multiprocessing as mp

    out_path = os.path.join(workdir, "gloo.json")
    mp.start_processes(_gloo_worker, args=(2, os.path.join(workdir, "gloo_store"), out_path, st.update_reps,
                                           st.data_gbs), nprocs=2, join=True, start_method="spawn")
    with open(out_path, encoding="utf-8") as f:
        per_rank = json.load(f)
    logger.info("2-process gloo measured")
    return {"world_size": 2, "backend": "gloo", "per_rank": per_rank}


# -- 3. index -----------------------------------------------------------------------------
def pile_samples_per_domain(seq: int) -> np.ndarray:
    gib = np.array([g for _, g in PILE_DOMAINS])
    return np.maximum(1, np.round(PILE_TOKENS * gib / gib.sum() / (seq + 1))).astype(np.int64)


def bench_blended_index(st: Settings) -> Dict[str, Any]:
    """BlendedDataset's index for ``steps x global batch`` samples, built as
    ``BlendedDataset._build_indices`` builds it (two arrays + ``helpers.build_blending_indices``)."""
    from megatron.core.datasets import helpers

    weights = pile_samples_per_domain(st.horizon_seq).astype(np.float64)
    weights = (weights / weights.sum()).tolist()
    res = {}
    for steps in st.horizons:
        size = steps * st.horizon_gbs
        times = []
        for _ in range(3 if st.mode == "full" else 1):
            gc.collect()
            t = time.perf_counter()
            dataset_index = np.zeros(size, dtype=np.int16)
            dataset_sample_index = np.zeros(size, dtype=np.int64)
            helpers.build_blending_indices(dataset_index, dataset_sample_index, weights, len(weights), size, False)
            times.append(time.perf_counter() - t)
            nbytes = dataset_index.nbytes + dataset_sample_index.nbytes
            dtypes = [str(dataset_index.dtype), str(dataset_sample_index.dtype)]
            del dataset_index, dataset_sample_index
        res[str(steps)] = {"samples": size, "bytes": int(nbytes), "dtypes": dtypes, "build_s": summary(times)}
    logger.info("BlendedDataset index measured")
    return res


def bench_online_index(st: Settings) -> Dict[str, Any]:
    """The mixer and ``OnlineBlendedDataset`` driven through the horizons (22 Pile-sized domains,
    odm-exp3 fed fixed synthetic per-domain losses through ``mixer.accumulate``); bytes of both
    (the dataset's minus a fresh one's: what it caches) after each horizon."""
    from odm_megatron.dataset import OnlineBlendedDataset
    from odm_megatron.sampling import epoch_permutation

    names = [n for n, _ in PILE_DOMAINS]
    sizes = pile_samples_per_domain(st.horizon_seq)
    prior, gbs = sizes / sizes.sum(), st.horizon_gbs
    losses = torch.from_numpy(np.linspace(1.6, 3.4, len(names))[np.random.default_rng(0).permutation(len(names))])
    build = {}
    for steps in st.horizons:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            ds = OnlineBlendedDataset([StubDataset(int(n)) for n in sizes], seed=SEED, domain_names=names)
            make_mixer(names, prior, ds.num_samples_per_domain, gbs)
            times.append(time.perf_counter() - t)
        build[str(steps)] = summary(times)
    ds = OnlineBlendedDataset([StubDataset(int(n)) for n in sizes], seed=SEED, domain_names=names)
    empty_ds_bytes = deep_bytes(ds)
    mixer = make_mixer(names, prior, ds.num_samples_per_domain, gbs)
    snapshots, t0 = {}, time.perf_counter()
    ones = torch.ones(gbs, 1)
    for step in range(max(st.horizons)):
        domains, positions = mixer.global_batch(step)
        ids = torch.from_numpy(np.asarray(domains))
        mixer.accumulate(losses[ids].float().unsqueeze(1), ones, ids)  # one "token" per sample: its domain's loss
        mixer.step_end(step)
        if step + 1 in st.horizons:
            for d in np.unique(np.asarray(domains)):  # what a worker caches after serving these positions
                last = int(np.asarray(positions)[np.asarray(domains) == d].max())
                ds.sample_index(int(d), last)
            cursors = np.asarray(mixer.cursors)
            snapshots[str(step + 1)] = {
                "mixer_bytes": deep_bytes(mixer), "dataset_cache_bytes": deep_bytes(ds) - empty_ds_bytes,
                "state_dict_json_bytes": len(json.dumps(mixer.state_dict(), default=_jsonable)),
                "epochs_per_domain": (cursors // sizes).tolist(),
                "weights": [round(float(w), 5) for w in mixer.current_weights],
            }
    logger.info("online index simulated for %d steps", max(st.horizons))
    return {"num_domains": len(names), "global_batch_size": gbs, "assumed_seq_length": st.horizon_seq,
            "assumed_tokens": PILE_TOKENS, "samples_per_domain_one_epoch": sizes.tolist(),
            "epoch_order_dtype": str(epoch_permutation(SEED, 0, 1, 2).dtype),
            "construct_s": build, "snapshots": snapshots, "simulated_steps": max(st.horizons),
            "simulation_s": time.perf_counter() - t0}


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(type(obj).__name__)


# -- main ---------------------------------------------------------------------------------
def measure(st: Settings, command: str) -> Dict[str, Any]:
    """Run every measurement; the figures (no derived numbers: see overhead_report.analyse)."""
    from odm_megatron.training.parallel import setup_parallel, teardown

    load_start, t0 = loadavg(), time.perf_counter()
    env = setup_parallel(seed=SEED)  # megatron-core's groups and BlendedDataset expect a process group
    try:
        figures: Dict[str, Any] = {"benchmark": "online mixing overhead vs megatron-core BlendedDataset",
                                   "mode": st.mode, "command": command, "settings": asdict(st),
                                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                   "machine": machine_info(), "update_interval": UPDATE_INTERVAL}
        with tempfile.TemporaryDirectory(prefix="odm-overhead-") as work:
            figures["data_path"] = bench_data_path(st, work)
            figures["model"], per_token_loss = bench_model(st, env)
            figures["feedback"] = bench_feedback(st, per_token_loss)
            figures["gloo"] = bench_gloo(st, work) if st.gloo else None
            figures["blended_index"] = bench_blended_index(st)
            figures["online_index"] = bench_online_index(st)
    finally:
        teardown()
    figures["load_average"] = {"start": load_start, "end": loadavg()}
    figures["wall_s"] = time.perf_counter() - t0
    return figures


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (for tests)")
    parser.add_argument("--output", default=None, help="directory for overhead.json and overhead.md "
                        "(default: docs/benchmarks; a fresh temporary directory with --smoke)")
    parser.add_argument("--no-gloo", action="store_true", help="skip the 2-process gloo measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[overhead %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.ERROR)
    st = SMOKE if args.smoke else FULL
    if args.no_gloo:
        st = replace(st, gloo=False)
    out_dir = args.output or (tempfile.mkdtemp(prefix="odm-overhead-") if args.smoke
                              else os.path.join(REPO, "docs", "benchmarks"))
    os.makedirs(out_dir, exist_ok=True)
    given = sys.argv[1:] if argv is None else argv
    figures = measure(st, " ".join(["python benchmarks/overhead.py", *(shlex.quote(a) for a in given)]))
    figures.update(report.analyse(figures))
    with open(os.path.join(out_dir, "overhead.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=1, default=_jsonable)
        f.write("\n")
    with open(os.path.join(out_dir, "overhead.md"), "w", encoding="utf-8") as f:
        f.write(report.render(figures))
    logger.info("wrote %s/overhead.json and overhead.md in %.0f s", out_dir, figures["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
