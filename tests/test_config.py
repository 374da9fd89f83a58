"""One vocabulary of mixing settings (odm_megatron.config): each rule once, the same flags read the
same way by the trainer, a Megatron-style parser and OdmConfig itself, and the old names kept."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from odm_megatron import errors
from odm_megatron.config import (DEFAULT_LAG, DEFAULT_UPDATE_INTERVAL, OdmConfig, add_odm_args, check_schedule,
                                 resolve_prior)
from odm_megatron.errors import CheckpointError, ConfigError
from odm_megatron.mixer import MixerConfig, OnlineMixer
from odm_megatron.policy import DEFAULT_POLICY
from odm_megatron.training.arguments import add_arguments, validate_args

# (OdmConfig keywords, the flag the one-line message must start with, a piece of what it says)
BAD = [
    (dict(policy="greedy"), "--odm-policy", "unknown policy"),
    (dict(update_interval=0), "--odm-update-interval", ">= 1"),
    (dict(update_interval=2.5), "--odm-update-interval", "integer"),
    (dict(lag=-1), "--odm-lag", ">= 0"),
    (dict(policy="odm-exp3", alpha=1.0), "--odm-alpha", "[0, 1)"),
    (dict(policy="smoothed-mean", alpha=-0.1), "--odm-alpha", "[0, 1)"),
    (dict(policy="odm-progress", eta=0.0), "--odm-eta", "> 0"),
    (dict(policy="odm-progress", trend_alpha=1.0), "--odm-trend-alpha", "(alpha=0.9, 1)"),
    (dict(policy="odm-progress", alpha=0.5, trend_alpha=0.4), "--odm-trend-alpha", "(alpha=0.5, 1)"),
    (dict(warmup_updates=-1), "--odm-warmup-updates", ">= 0"),
    (dict(warmup_updates=1.5), "--odm-warmup-updates", "integer"),
    (dict(policy="odm-exp3", eta=0.1), "--odm-eta", "does not apply to --odm-policy odm-exp3"),
    (dict(policy="static", alpha=0.9), "--odm-alpha", "does not apply to --odm-policy static"),
    (dict(prior="zipf"), "--odm-prior", "expected natural, uniform, W1,W2,..."),
    (dict(prior="0.5,-0.5"), "--odm-prior", "non-negative"),
    (dict(prior="0,0"), "--odm-prior", "not all zero"),
    (dict(prior="nan,1"), "--odm-prior", "finite"),
    (dict(prior="/no/such/prior.json"), "--odm-prior", "no such file"),
    (dict(domain_names=["a", "a"]), "--odm-domain-names", "more than once"),
]


@pytest.mark.parametrize("kwargs,flag,says", BAD, ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(BAD)])
def test_each_rule_once_with_a_one_line_message_naming_the_flag(kwargs, flag, says):
    with pytest.raises(ConfigError) as e:
        OdmConfig(**kwargs)
    message = str(e.value)
    assert message.startswith(flag) and says in message and "\n" not in message, message


def test_the_limits_themselves_are_accepted():
    OdmConfig(update_interval=1, lag=0, warmup_updates=0)
    OdmConfig(policy="odm-exp3", alpha=0.0)
    OdmConfig(policy="odm-exp3", alpha=0.999)
    OdmConfig(policy="odm-progress", alpha=0.5, trend_alpha=0.6, eta=1e-6)
    OdmConfig(policy="static", warmup_updates=3, prior="0,1")


def test_defaults_are_the_same_everywhere():
    trainer = _trainer_parser().parse_args([])
    megatron = _megatron_parser().parse_args([])
    mixer = MixerConfig(domain_names=["a"], seed=0, global_batch_size=1)
    assert DEFAULT_UPDATE_INTERVAL == 1 and DEFAULT_LAG == 2
    for interval, lag in [(OdmConfig().update_interval, OdmConfig().lag), (mixer.update_interval, mixer.lag),
                          (trainer.odm_update_interval, trainer.odm_lag),
                          (megatron.odm_update_interval, megatron.odm_lag)]:
        assert (interval, lag) == (DEFAULT_UPDATE_INTERVAL, DEFAULT_LAG)
    assert trainer.odm_policy == DEFAULT_POLICY == OdmConfig().policy == mixer.policy
    assert megatron.odm_policy is None  # Megatron-LM: mixing is off unless --odm-policy is given
    with pytest.raises(ConfigError, match="--odm-policy"):
        OdmConfig.from_args(megatron)


def _trainer_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _megatron_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)  # as Megatron-LM's own parser
    parser.add_argument("--seed", type=int, default=1234)  # one of Megatron's flags, next to ours
    add_odm_args(parser, policy_default=None)
    return parser


def _trainer_config(argv, tmp_path) -> OdmConfig:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    args = _trainer_parser().parse_args(["--manifest", str(manifest), "--train-iters", "4", *argv])
    return validate_args(args, world_size=1, have_gpu=False).odm_config


SAME_FLAGS = [
    (["--odm-policy", "odm-exp3", "--odm-alpha", "0.5", "--odm-lag", "0", "--odm-update-interval", "4"],
     dict(policy="odm-exp3", alpha=0.5, lag=0, update_interval=4)),
    (["--odm-policy", "odm-progress", "--odm-eta", "0.2", "--odm-trend-alpha", "0.99", "--odm-warmup-updates", "3",
      "--odm-prior", "uniform"],
     dict(policy="odm-progress", eta=0.2, trend_alpha=0.99, warmup_updates=3, prior="uniform")),
    (["--odm-policy", "static", "--odm-prior", "0.4,0.3,0.2,0.1"], dict(policy="static", prior="0.4,0.3,0.2,0.1")),
]


@pytest.mark.parametrize("argv,direct", SAME_FLAGS)
def test_the_same_flags_give_the_same_config_in_every_front_end(argv, direct, tmp_path):
    expected = OdmConfig(**direct)
    assert _trainer_config(argv, tmp_path) == expected
    assert OdmConfig.from_args(_megatron_parser().parse_args(argv)) == expected


@pytest.mark.parametrize("argv", [["--odm-alpha", "1.0"], ["--odm-lag", "-1"], ["--odm-update-interval", "0"],
                                  ["--odm-prior", "1,x"], ["--odm-eta", "0.1"]])
def test_the_same_bad_flag_gives_the_same_error_in_every_front_end(argv, tmp_path):
    argv = ["--odm-policy", "odm-exp3", *argv]
    messages = []
    for build in (lambda: _trainer_config(argv, tmp_path),
                  lambda: OdmConfig.from_args(_megatron_parser().parse_args(argv))):
        with pytest.raises(ConfigError) as e:
            build()
        messages.append(str(e.value))
    assert messages[0] == messages[1] and messages[0].startswith(argv[2]), messages


def test_the_trainer_keeps_its_old_flag_names_as_aliases(tmp_path):
    old = _trainer_config(["--policy", "odm-exp3", "--prior", "uniform", "--update-interval", "5"], tmp_path)
    new = _trainer_config(["--odm-policy", "odm-exp3", "--odm-prior", "uniform", "--odm-update-interval", "5"],
                          tmp_path)
    assert old == new == OdmConfig(policy="odm-exp3", prior="uniform", update_interval=5)
    with pytest.raises(SystemExit):  # the Megatron-LM parser does not take the trainer's old names
        _megatron_parser().parse_args(["--policy", "odm-exp3"])


def test_a_weight_list_prior_is_accepted_by_the_trainer_and_checked_against_the_domains(tmp_path, capsys):
    data_path = ["1", "/d/a_text_document", "1", "/d/b_text_document", "1", "/d/c_text_document",
                 "1", "/d/d_text_document"]
    common = ["--data-path", *data_path, "--vocab-size", "256", "--eod-id", "0", "--train-iters", "4"]
    args = validate_args(_trainer_parser().parse_args([*common, "--prior", "0.4,0.3,0.2,0.1"]), world_size=1,
                         have_gpu=False)
    prior = args.odm_config.resolve_prior(["a", "b", "c", "d"], np.ones(4))
    assert prior.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
    with pytest.raises(ConfigError, match=r"^--odm-prior 0.4,0.3,0.2: 3 weights for 4 domains \['a', 'b', 'c', 'd'\]"):
        validate_args(_trainer_parser().parse_args([*common, "--prior", "0.4,0.3,0.2"]), world_size=1, have_gpu=False)


def test_a_weight_list_prior_of_the_wrong_length_stops_train_with_one_line(tmp_path, capsys):
    """With a manifest the domains are known when the run starts: exit 2 before any process group."""
    from training_fixtures import TINY_MODEL, make_corpus

    from odm_megatron.cli import main

    manifest = make_corpus(str(tmp_path / "corpus"), docs_per_domain=8)  # counting, motif, noise
    rc = main(["train", "--manifest", manifest, *TINY_MODEL, "--train-iters", "2", "--odm-prior", "0.5,0.5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("--odm-prior 0.5,0.5: 2 weights for 3 domains ['counting', 'motif', 'noise'] "
                                    "(give one weight per domain, in this order)"), err


def test_the_trainer_refuses_the_megatron_only_flags(tmp_path):
    for argv, says in [(["--odm-domain-names", "a", "b"], "--odm-domain-names is for the Megatron-LM"),
                       (["--odm-log", str(tmp_path / "m.jsonl")], "--odm-log is for the Megatron-LM")]:
        with pytest.raises(ConfigError, match=says):
            _trainer_config(argv, tmp_path)


def test_prior_forms(tmp_path):
    names = ["code", "web", "books"]
    natural = np.array([2.0, 1.0, 1.0])
    assert OdmConfig(prior="natural").resolve_prior(names, natural).tolist() == [0.5, 0.25, 0.25]
    assert OdmConfig(prior="uniform").resolve_prior(names, natural).tolist() == pytest.approx([1 / 3] * 3)
    assert OdmConfig(prior="1,1,2").resolve_prior(names, natural).tolist() == [0.25, 0.25, 0.5]
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"books": 3, "web": 1, "code": 0}))
    assert OdmConfig(prior=str(path)).resolve_prior(names, natural).tolist() == [0.0, 0.25, 0.75]
    path.write_text(json.dumps({"weights": {"books": 1, "web": 1}}))
    with pytest.raises(ConfigError, match=r"missing \['code'\]"):
        OdmConfig(prior=str(path)).resolve_prior(names, natural)
    with pytest.raises(ConfigError, match="^--prior 1,2: 2 weights for 3 domains"):  # the old flag name, kept
        resolve_prior("1,2", names, natural, flag="--prior")


def test_the_config_reaches_the_mixer_and_its_policy():
    odm = OdmConfig(policy="odm-progress", alpha=0.8, eta=0.3, update_interval=3, lag=1, prior="3,1")
    config = odm.mixer_config(["a", "b"], seed=5, global_batch_size=8)
    assert (config.update_interval, config.lag, config.policy, config.seed) == (3, 1, "odm-progress", 5)
    mixer = OnlineMixer(config, prior=odm.resolve_prior(["a", "b"], [1, 1]), num_samples_per_domain=[10, 10])
    assert (mixer.policy.alpha, mixer.policy.eta) == (0.8, 0.3)
    assert mixer.weights_for_step(0).tolist() == [0.75, 0.25]
    with pytest.raises(ConfigError, match="global_batch_size"):
        odm.mixer_config(["a", "b"], seed=5, global_batch_size=0)
    assert OdmConfig(policy="static").policy_kwargs() == {}


def test_mixer_config_applies_the_same_schedule_rules():
    for kwargs in (dict(update_interval=0), dict(lag=-1), dict(policy="greedy")):
        with pytest.raises(ConfigError) as from_mixer:
            MixerConfig(domain_names=["a"], seed=0, global_batch_size=1, **kwargs)
        with pytest.raises(ConfigError) as from_odm:
            OdmConfig(**kwargs)
        assert str(from_mixer.value) == str(from_odm.value)
    with pytest.raises(ConfigError, match="--odm-lag"):
        check_schedule("odm-exp3", 1, -2)


def test_domain_names():
    assert OdmConfig().resolve_domain_names(["a", "b"]) == ["a", "b"]
    assert OdmConfig(domain_names=["x", "y"]).resolve_domain_names(["a", "b"]) == ["x", "y"]
    with pytest.raises(ConfigError, match="--odm-domain-names lists 1 names for 2 prefixes"):
        OdmConfig(domain_names=["x"]).resolve_domain_names(["a", "b"])


def test_old_error_names_are_the_new_types():
    from odm_megatron.integrations import deepspeed as odm_ds
    from odm_megatron.integrations import megatron_lm as odm_lm
    from odm_megatron.state import BanditStateError
    from odm_megatron.training import arguments

    assert arguments.ConfigError is odm_lm.OdmConfigError is errors.ConfigError
    assert odm_ds.OdmCheckpointError is odm_lm.OdmCheckpointError is errors.CheckpointError
    assert issubclass(BanditStateError, errors.CheckpointError)
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)


def test_deepspeed_build_mixer(tmp_path):
    from core_fixtures import write_indexed_dataset

    from odm_megatron.dataset import OnlineBlendedDataset, TokenizerSpec, build_domain_datasets, make_gpt_dataset_config
    from odm_megatron.integrations import deepspeed as odm_ds

    rng = np.random.default_rng(0)
    prefixes = []
    for name, docs in (("code", 6), ("web", 18)):
        prefix = str(tmp_path / f"{name}_text_document")
        write_indexed_dataset(prefix, [np.append(rng.integers(1, 50, size=40), 0) for _ in range(docs)])
        prefixes.append(prefix)
    cfg = make_gpt_dataset_config(3, 16, TokenizerSpec(64, 0), path_to_cache=str(tmp_path / "cache"))
    dataset = OnlineBlendedDataset(build_domain_datasets(prefixes, cfg, domain_names=["code", "web"]), seed=3,
                                   domain_names=["code", "web"])

    class Engine:  # what build_mixer reads from a DeepSpeed engine
        device = "cpu"

        @staticmethod
        def train_batch_size():
            return 6

    parser = argparse.ArgumentParser()
    add_odm_args(parser)
    odm = OdmConfig.from_args(parser.parse_args(["--odm-policy", "odm-exp3", "--odm-update-interval", "2"]))
    mixer = odm_ds.build_mixer(odm, dataset, Engine())
    n = dataset.num_samples_per_domain
    assert mixer.config.global_batch_size == 6 and mixer.config.seed == 3 and mixer.config.update_interval == 2
    np.testing.assert_allclose(mixer.policy.prior, n / n.sum())  # natural: samples per domain
    loader = odm_ds.build_dataloader(dataset, mixer, (0, 1), micro_batch_size=3)
    assert len(next(iter(loader))["tokens"]) == 3
    mixer = odm_ds.build_mixer(OdmConfig(prior="1,3"), dataset, 4, seed=9)
    assert mixer.config.seed == 9 and mixer.policy.prior.tolist() == [0.25, 0.75]
    with pytest.raises(ConfigError, match="differ from the dataset's domains"):
        odm_ds.build_mixer(OdmConfig(domain_names=["a", "b"]), dataset, 4)


def test_train_runs_with_a_weight_list_prior(tmp_path):
    """End to end: `odm-megatron train --odm-policy static --odm-prior W1,W2,W3` samples with those weights."""
    from training_fixtures import TINY_MODEL, make_corpus, read_jsonl, run_cli

    manifest = make_corpus(str(tmp_path / "corpus"), docs_per_domain=8)  # counting, motif, noise
    logs = str(tmp_path / "logs")
    proc = run_cli(["train", "--manifest", manifest, *TINY_MODEL, "--train-iters", "2", "--no-tensorboard",
                    "--odm-policy", "static", "--odm-prior", "2,1,1", "--log-dir", logs])
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = [row["weights"] for row in read_jsonl(os.path.join(logs, "mixture.jsonl"))]
    assert weights and all(w == {"counting": 0.5, "motif": 0.25, "noise": 0.25} for w in weights), weights
