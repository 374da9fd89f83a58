"""Online mixing inside Megatron-LM's own training loop (``megatron.training.pretrain``), on CPU.

Each case runs a tiny GPT under torchrun with 2 gloo processes on shards made by
``odm-megatron preprocess`` (3 domains, ``--odm-update-interval 1`` so that odm-exp3's uniform
exploration ends within the run and the weights move), three times:

    full    2N iterations, checkpoints (torch_dist) every N
    first   the same command, stopped by Megatron's ``--exit-interval N`` (checkpoint at N)
    resumed the same command again, ``--load``-ing that checkpoint, to 2N

and checks that first + resumed reproduce full: the per-iteration loss and grad norm that
Megatron logs, ``<save>/odm/mixture.jsonl`` (every update's weights and per-domain losses) and
the bandit state saved with each checkpoint, for DP=2, TP=2 and PP=2.

Entry points:
- ``odm-megatron pretrain-gpt``: the GPT loop shipped here over the megatron-core wheel's
  ``megatron.training`` (megatron-core >= 0.17; skipped otherwise);
- ``odm-megatron megatron-lm $MEGATRON_LM_DIR/pretrain_gpt.py``: a user's unmodified checkout
  (its ``megatron`` package first on ``PYTHONPATH``); skipped unless ``MEGATRON_LM_DIR`` is set
  (``tools/check_megatron_lm.sh CHECKOUT`` runs these for one checkout).

``ODM_CI_REQUIRE_REAL_LOOP=1`` (set by ``.ci/run``'s Python 3.12 stack) turns the pretrain-gpt
skip into a failure, so that CI cannot pass without running the loop.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import pytest

from odm_megatron.cli import main as cli_main
from odm_megatron.preprocess.fixtures import make_documents, write_corpus

from fixtures_corpus import train_test_tokenizer
from training_fixtures import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 3                        # iterations per job; the full run does 2N
DOMAINS = {"Pile-CC": 90, "Github": 90, "DM Mathematics": 90}
LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
}
# What Megatron-LM needs to run on CPU: no fused/TE kernels, gloo, CPU initialization.
CPU_FLAGS = [
    "--transformer-impl", "local", "--attention-backend", "unfused",
    "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
    "--no-rope-fusion", "--distributed-backend", "gloo",
]
JOB_TIMEOUT_S = 600


def _pretrain_gpt_unavailable() -> Optional[str]:
    """Why ``odm-megatron pretrain-gpt`` cannot run here (None: it can)."""
    from importlib import metadata

    try:
        version = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "megatron-core is not installed"
    major, minor = (int(x) for x in re.findall(r"\d+", version)[:2])
    if (major, minor) < (0, 17):
        return (f"megatron-core {version} has no megatron.training (the wheel ships it from 0.17, "
                "which needs Python 3.12); .ci/run's Python 3.12 stack runs this")
    try:
        import megatron.training  # noqa: F401
    except ImportError as exc:
        return f"megatron-core {version}: megatron.training does not import ({exc})"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("ODM_CI_REQUIRE_REAL_LOOP"):
        pytest.fail(f"ODM_CI_REQUIRE_REAL_LOOP is set but the real loop cannot run: {reason}")
    pytest.skip(reason)


def _odm_megatron_script() -> str:
    """The console script of this interpreter's environment (not whatever is first on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "odm-megatron")
    found = here if os.path.exists(here) else shutil.which("odm-megatron")
    if not found:
        pytest.fail("no odm-megatron console script next to this Python: pip install -e . first")
    return found


@pytest.fixture(scope="module")
def pretrain_gpt_ready() -> None:
    """Skips (or fails, under ODM_CI_REQUIRE_REAL_LOOP) before the shards are built."""
    reason = _pretrain_gpt_unavailable()
    if reason:
        _skip_or_fail(reason)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Dict[str, object]:
    """A SentencePiece model and 3 domains of shards from ``odm-megatron preprocess``."""
    work = tmp_path_factory.mktemp("real_loop_data")
    tokenizer = train_test_tokenizer(str(work), make_documents(seed=10))
    corpus = write_corpus(str(work / "corpus.jsonl"), make_documents(DOMAINS, words_per_doc=80, seed=3))
    out = work / "shards"
    assert cli_main(["preprocess", "--input", corpus, "--tokenizer-model", tokenizer,
                     "--output-dir", str(out), "--append-eod"]) == 0
    prefixes = sorted(str(out / name[: -len(".bin")]) for name in os.listdir(out) if name.endswith(".bin"))
    assert len(prefixes) == len(DOMAINS), prefixes
    return {"tokenizer": tokenizer, "prefixes": prefixes}


def megatron_args(shards: Dict[str, object], save: str, layout: str) -> List[str]:
    return [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64",
        "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(2 * N), "--lr", "1e-3", "--lr-decay-style", "constant",
        "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "1234",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(shards["tokenizer"]),
        "--data-path", *shards["prefixes"], "--split", "100,0,0",
        "--eval-iters", "0", "--eval-interval", str(100 * N), "--num-workers", "1",
        "--save", save, "--load", save, "--save-interval", str(N), "--ckpt-format", "torch_dist",
        "--log-interval", "1",
        *CPU_FLAGS, *LAYOUTS[layout],
        "--odm-policy", "odm-exp3", "--odm-update-interval", "1", "--odm-lag", "2",
    ]


def run_job(entry: List[str], args: List[str], env_extra: Dict[str, str], log: str) -> str:
    """One torchrun job (2 processes) of ``odm-megatron ENTRY ARGS`` (or, with ``entry[0]`` a
    ``.py`` file, of that script); returns its output, fails the test on a non-zero exit."""
    # megatron-core's LanguageModule writes NVTE_*_ATTN into os.environ for its attention backend
    # ("auto" by default) when any earlier test in this process built a model; Megatron-LM then
    # refuses --attention-backend unfused. Those are this process's leftovers, not settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}
    env.update(OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra)
    program = entry if entry[0].endswith(".py") else ["--no-python", _odm_megatron_script(), *entry]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *program, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=JOB_TIMEOUT_S)
    with open(log, "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n\n" + proc.stdout)
    assert proc.returncode == 0, f"exit {proc.returncode} (log: {log}):\n" + proc.stdout[-6000:]
    return proc.stdout


ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|.*?\| grad norm: ([0-9.]+) \|")


def iteration_log(output: str) -> List[Tuple[int, str, str]]:
    """(iteration, lm loss, grad norm) as Megatron's training_log printed them."""
    return [(int(i), loss, norm) for i, loss, norm in ITER_LINE.findall(output)]


def read_jsonl(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def odm_dir(save: str) -> str:
    return os.path.join(save, "odm")


def state_file(save: str, iteration: int) -> str:
    return os.path.join(odm_dir(save), f"iter_{iteration:07d}.json")


def check_resume_matches(full_out: str, first_out: str, resumed_out: str, full_save: str,
                         split_save: str) -> None:
    full, first, resumed = iteration_log(full_out), iteration_log(first_out), iteration_log(resumed_out)
    assert [i for i, _, _ in full] == list(range(1, 2 * N + 1)), full_out[-3000:]
    assert [i for i, _, _ in first] == list(range(1, N + 1)), first_out[-3000:]
    assert [i for i, _, _ in resumed] == list(range(N + 1, 2 * N + 1)), resumed_out[-3000:]

    # Grad norm is logged per iteration: identical everywhere.
    assert [g for _, _, g in first + resumed] == [g for _, _, g in full]
    # Loss: Megatron's training_log does not reset its sums after the first line a job prints,
    # so each job's second line is the mean of its first two iterations. The first job logs as the
    # full run does; in the resumed job only that one line (iteration N+2) is a mean.
    assert first == full[:N]
    loss = {i: l for i, l, _ in full}
    resumed_loss = {i: l for i, l, _ in resumed}
    for i in range(N + 1, 2 * N + 1):
        if i == N + 2:
            expected = (float(loss[N + 1]) + float(loss[N + 2])) / 2
            assert float(resumed_loss[i]) == pytest.approx(expected, rel=2e-6), (i, resumed_loss[i], expected)
        else:
            assert resumed_loss[i] == loss[i], (i, resumed_loss[i], loss[i])

    # Every update's weights and per-domain losses, written by the jobs as they ran.
    full_mix = read_jsonl(os.path.join(odm_dir(full_save), "mixture.jsonl"))
    split_mix = read_jsonl(os.path.join(odm_dir(split_save), "mixture.jsonl"))
    assert len(full_mix) == 2 * N, full_mix
    assert split_mix == full_mix

    # The bandit state saved with each checkpoint.
    for iteration in (N, 2 * N):
        with open(state_file(full_save, iteration), encoding="utf-8") as f:
            full_state = json.load(f)
        with open(state_file(split_save, iteration), encoding="utf-8") as f:
            split_state = json.load(f)
        assert split_state == full_state, f"bandit state at iteration {iteration} differs"

    # The weights moved: odm-exp3's uniform exploration ended and the loss feedback acted.
    names = sorted(full_mix[0]["weights"])
    first_w = [full_mix[0]["weights"][n] for n in names]
    last_w = [full_mix[-1]["weights"][n] for n in names]
    assert max(abs(a - b) for a, b in zip(first_w, last_w)) > 1e-3, (first_w, last_w)
    assert max(last_w) - min(last_w) > 1e-3, last_w


def run_three(entry: List[str], shards: Dict[str, object], layout: str, tmp_path,
              env_extra: Dict[str, str]) -> None:
    full_save, split_save = str(tmp_path / "full"), str(tmp_path / "split")
    full_out = run_job(entry, megatron_args(shards, full_save, layout), env_extra, str(tmp_path / "full.log"))
    first_out = run_job(entry, megatron_args(shards, split_save, layout) + ["--exit-interval", str(N)],
                        env_extra, str(tmp_path / "first.log"))
    assert not os.path.exists(state_file(split_save, 2 * N)), "the first job ran past --exit-interval"
    resumed_out = run_job(entry, megatron_args(shards, split_save, layout), env_extra,
                          str(tmp_path / "resumed.log"))
    check_resume_matches(full_out, first_out, resumed_out, full_save, split_save)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pretrain_gpt_resume_is_exact(pretrain_gpt_ready, shards, layout, tmp_path):
    """``odm-megatron pretrain-gpt`` (megatron-core's own megatron.training, no checkout)."""
    run_three(["pretrain-gpt"], shards, layout, tmp_path, {})


needs_checkout = pytest.mark.skipif(
    not os.environ.get("MEGATRON_LM_DIR"),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout (tools/check_megatron_lm.sh does)")


def _checkout() -> Tuple[str, Dict[str, str]]:
    """The checkout's pretrain_gpt.py and the environment that puts its megatron package first,
    as when running that script directly."""
    checkout = os.path.abspath(os.environ["MEGATRON_LM_DIR"])
    script = os.path.join(checkout, "pretrain_gpt.py")
    assert os.path.isfile(script), f"MEGATRON_LM_DIR={checkout} has no pretrain_gpt.py"
    pythonpath = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH", "")) if p)
    return script, {"PYTHONPATH": pythonpath}


@needs_checkout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_lm_checkout_resume_is_exact(shards, layout, tmp_path):
    """``odm-megatron megatron-lm CHECKOUT/pretrain_gpt.py``: a user's unmodified checkout."""
    script, env = _checkout()
    run_three(["megatron-lm", script], shards, layout, tmp_path, env)


@needs_checkout
def test_megatron_lm_checkout_patched_matches_launcher(shards, tmp_path):
    """``patches/megatron-lm/install.patch`` (the one ``install()`` line) applied to the checkout's
    pretrain_gpt.py, run directly with ``--odm-policy``, trains exactly as the launcher does."""
    script, env = _checkout()
    patched = tmp_path / "patched"
    patched.mkdir()
    shutil.copy(script, patched / "pretrain_gpt.py")
    subprocess.run(["git", "apply", os.path.join(REPO, "patches", "megatron-lm", "install.patch")],
                   cwd=patched, check=True, capture_output=True)
    assert "install()" in (patched / "pretrain_gpt.py").read_text(encoding="utf-8")
    # The rest of the checkout (gpt_builders, megatron, ...) comes from PYTHONPATH.
    args = lambda save: megatron_args(shards, save, "dp2")  # noqa: E731
    via_patch = run_job([str(patched / "pretrain_gpt.py")], args(str(tmp_path / "patched_run")), env,
                        str(tmp_path / "patched.log"))
    via_launcher = run_job(["megatron-lm", script], args(str(tmp_path / "launcher_run")), env,
                           str(tmp_path / "launcher.log"))
    assert iteration_log(via_patch) == iteration_log(via_launcher)
    assert len(iteration_log(via_patch)) == 2 * N
    mix = [read_jsonl(os.path.join(odm_dir(str(tmp_path / run)), "mixture.jsonl"))
           for run in ("patched_run", "launcher_run")]
    assert len(mix[0]) == 2 * N and mix[0] == mix[1]
    for iteration in (N, 2 * N):
        with open(state_file(str(tmp_path / "patched_run"), iteration), encoding="utf-8") as a, \
                open(state_file(str(tmp_path / "launcher_run"), iteration), encoding="utf-8") as b:
            assert json.load(a) == json.load(b)
