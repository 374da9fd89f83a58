"""Unit tests of the hooks in ``odm_megatron.integrations.megatron_lm`` (``glue``), without
Megatron-LM's training code: a fake ``args`` namespace with Megatron's flag names, tiny per-domain
indexed datasets (real megatron-core datasets), and the hooks driven in the order Megatron-LM's
loop calls them once ``install()`` has wrapped it. (``tests/test_megatron_lm_hooks.py`` checks the
wrapping against every supported release; ``tests/test_megatron_lm_real_loop.py`` runs the loop.)"""
import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core_fixtures import EOD, VOCAB_SIZE, make_domains
from odm_megatron.dataset import OnlineBlendedDataset, make_gpt_dataset_config, TokenizerSpec
from odm_megatron.integrations import megatron_lm as odm_lm

SEQ, GBS, MBS = 16, 8, 2


@pytest.fixture(autouse=True)
def fresh_runtime():
    odm_lm.reset()
    yield
    odm_lm.reset()


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    return make_domains(str(tmp_path_factory.mktemp("domains")), [30, 20, 50], doc_len=40, seed=5)


def make_args(prefixes, tmp_path, **overrides):
    """The Megatron flags the glue reads, with Megatron's names and defaults."""
    parser = odm_lm.add_odm_args(argparse.ArgumentParser())
    odm = parser.parse_args(["--odm-policy", "odm-exp3", "--odm-update-interval", "2", "--odm-lag", "2"])
    data_path = [x for p, w in zip(prefixes, ["0.2", "0.3", "0.5"]) for x in (w, p)]
    args = SimpleNamespace(
        seed=11, seq_length=SEQ, global_batch_size=GBS, micro_batch_size=MBS, train_iters=10, train_samples=None,
        data_path=data_path, train_data_path=None, data_args_path=None, per_split_data_args_path=None,
        split="100,0,0", data_cache_path=str(tmp_path / "cache"), save=str(tmp_path / "ckpt"), load=None,
        iteration=0, consumed_train_samples=0, num_workers=0, dataloader_type="single", rampup_batch_size=None,
        mock_data=False, sft=False, fim_data=False, eod_mask_loss=False, reset_position_ids=False,
        reset_attention_mask=False, exit_signal_handler=False, **vars(odm),
    )
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


TOKENIZER = SimpleNamespace(vocab_size=VOCAB_SIZE, eod=EOD)


class StandIn(torch.nn.Module):
    """What Megatron's GPTModel returns with labels: per-token losses [b, s]; here a pure
    function of the tokens, so runs can be compared exactly."""

    def forward(self, tokens):
        return (tokens.float() % 17) / 4.0 + 1.0


def train(args, steps, save_at=None, dp_rank=0, dp_size=1):
    """The patched Megatron calls, in order: provider, loader, forward/loss per micro-batch,
    step end, save. Returns the tokens read and the weights of each step."""
    dataset, mixer = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    loader = odm_lm.build_odm_dataloader(dataset, args, dp_rank=dp_rank, dp_size=dp_size)
    it = iter(loader)
    model = StandIn().train()
    tokens, weights = [], {}
    for step in range(args.iteration, steps):
        weights[step] = mixer.weights_for_step(step).tolist()
        for _ in range(GBS // (MBS * dp_size)):
            tapped = odm_lm.tap(it)
            batch = next(tapped)
            loss = model(batch["tokens"])
            odm_lm.odm_loss_hook(loss, batch["loss_mask"], odm_lm.dataset_id_of(tapped), model)
            tokens.append(batch["tokens"].tolist())
        odm_lm.odm_step_end(step)
        if save_at == step + 1:
            odm_lm.odm_save_state(args, step + 1)
    return tokens, weights, mixer


# -- flags and data ------------------------------------------------------------------------------
def test_flags_chain_with_another_provider():
    def other(parser):
        parser.add_argument("--modelopt-thing", default=1)
        return parser

    parser = odm_lm.with_odm_args(other)(argparse.ArgumentParser())
    args = parser.parse_args(["--odm-policy", "smoothed-mean", "--odm-prior", "uniform", "--odm-alpha", "0.5"])
    assert args.modelopt_thing == 1 and args.odm_policy == "smoothed-mean" and args.odm_alpha == 0.5
    assert odm_lm.is_enabled(args)
    assert not odm_lm.is_enabled(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--odm-policy", "no-such-policy"])


def test_train_blend_sources(tmp_path):
    ns = SimpleNamespace
    assert odm_lm.train_blend(ns(data_path=["0.3", "a", "0.7", "b"])) == (["a", "b"], [0.3, 0.7], False)
    assert odm_lm.train_blend(ns(data_path=["a", "b"])) == (["a", "b"], None, False)
    assert odm_lm.train_blend(ns(data_path=["x"], train_data_path=["1", "t"])) == (["t"], [1.0], True)
    f = tmp_path / "data_args.txt"
    f.write_text("1 p 3 q\n")
    assert odm_lm.train_blend(ns(data_args_path=str(f))) == (["p", "q"], [1.0, 3.0], False)
    j = tmp_path / "per_split.json"
    j.write_text(json.dumps({"train": ["u", "v"], "valid": ["w"]}))
    assert odm_lm.train_blend(ns(per_split_data_args_path=str(j))) == (["u", "v"], None, True)
    with pytest.raises(odm_lm.OdmConfigError, match=r"^--odm-policy needs the training domains in --data-path \(or --train-data-path\)$"):
        odm_lm.train_blend(ns(data_path=None))


def test_domain_names():
    ns = SimpleNamespace(odm_domain_names=None)
    assert odm_lm.domain_names_for(ns, ["/d/github_text_document", "/d/arxiv"]) == ["github", "arxiv"]
    with pytest.raises(odm_lm.OdmConfigError,
                       match=r"^prefixes give the same domain name \['web'\]; name them with --odm-domain-names$"):
        odm_lm.domain_names_for(ns, ["/a/web_text_document", "/b/web_text_document"])
    with pytest.raises(odm_lm.OdmConfigError, match="^--odm-domain-names lists 2 names for 3 prefixes$"):
        odm_lm.domain_names_for(SimpleNamespace(odm_domain_names=["a", "b"]), ["x", "y", "z"])


def test_prior(tmp_path):
    names, n = ["a", "b"], np.array([10, 30])
    np.testing.assert_allclose(odm_lm.resolve_prior("natural", names, [1, 3], n), [0.25, 0.75])
    np.testing.assert_allclose(odm_lm.resolve_prior("natural", names, None, n), [0.25, 0.75])
    np.testing.assert_allclose(odm_lm.resolve_prior("uniform", names, [1, 3], n), [0.5, 0.5])
    np.testing.assert_allclose(odm_lm.resolve_prior("1,4", names, None, n), [0.2, 0.8])
    f = tmp_path / "prior.json"
    f.write_text(json.dumps({"b": 1, "a": 3}))
    np.testing.assert_allclose(odm_lm.resolve_prior(str(f), names, None, n), [0.75, 0.25])
    for bad in ("1,2,3", "0,0", "x"):
        with pytest.raises(odm_lm.OdmConfigError):
            odm_lm.resolve_prior(bad, names, None, n)


@pytest.mark.parametrize("flag,value,message", [
    ("rampup_batch_size", ["4", "4", "100"], "^--odm-policy does not support --rampup-batch-size$"),
    ("mock_data", True, "^--odm-policy does not support --mock-data$"),
    ("logits_load_dir", "/x", "^--odm-policy does not support --logits-load-dir$"),
    ("dataloader_type", "cyclic", "^--odm-policy needs --dataloader-type single, got 'cyclic'$"),
    ("odm_update_interval", 0, r"^--odm-update-interval \(optimizer steps per policy update\) must be an integer "
                               r">= 1, got 0$"),
])
def test_unsupported_flags_are_named(prefixes, tmp_path, flag, value, message):
    with pytest.raises(odm_lm.OdmConfigError, match=message):
        odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path, **{flag: value}), TOKENIZER)


def test_valid_and_test_keep_megatron_sizes():
    assert odm_lm.odm_dataset_sizes([80, 16, 8]) == [0, 16, 8]


# -- dataset, mixer, loader ----------------------------------------------------------------------
def test_dataset_and_mixer_on_every_rank(prefixes, tmp_path):
    args = make_args(prefixes, tmp_path)
    dataset, mixer = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    assert isinstance(dataset, OnlineBlendedDataset)
    assert dataset.domain_names == mixer.domain_names == ["domain0", "domain1", "domain2"]
    np.testing.assert_allclose(mixer.current_weights, [0.2, 0.3, 0.5])  # natural = the --data-path weights
    assert mixer.config.global_batch_size == GBS and mixer.config.lag == 2 and mixer.config.update_interval == 2
    # A second call (virtual pipeline stages) reuses the mixer; ranks without a loader get no dataset.
    again, same = odm_lm.build_odm_train_dataset(args, TOKENIZER, built_on_rank=False)
    assert again is None and same is mixer
    assert odm_lm.build_odm_dataloader(None, args) is None


def test_policy_hyperparameters_reach_the_policy(prefixes, tmp_path):
    args = make_args(prefixes, tmp_path, odm_policy="odm-progress", odm_eta=0.2, odm_trend_alpha=0.99, odm_alpha=0.8)
    _, mixer = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    policy = mixer.policy
    assert (policy.name, policy.eta, policy.trend_alpha, policy.alpha) == ("odm-progress", 0.2, 0.99, 0.8)


def test_dataset_config_from_megatron(prefixes, tmp_path):
    """pretrain_gpt.py passes its GPTDatasetConfig: its split applies per domain, as in Megatron."""
    config = make_gpt_dataset_config(11, SEQ, TokenizerSpec(VOCAB_SIZE, EOD), path_to_cache=str(tmp_path / "c"),
                                     split="80,10,10")
    args = make_args(prefixes, tmp_path, split="80,10,10")
    dataset, _ = odm_lm.build_odm_train_dataset(args, config)
    odm_lm.reset()
    whole, _ = odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path, split="100,0,0"), TOKENIZER)
    assert np.all(dataset.num_samples_per_domain < whole.num_samples_per_domain)
    odm_lm.reset()
    # --train-data-path: whole prefixes even though the Megatron config has no split.
    per_split = make_gpt_dataset_config(11, SEQ, TokenizerSpec(VOCAB_SIZE, EOD), path_to_cache=str(tmp_path / "c"))
    per_split_args = make_args(prefixes, tmp_path, data_path=None, train_data_path=list(prefixes))
    train_only, mixer = odm_lm.build_odm_train_dataset(per_split_args, per_split)
    np.testing.assert_array_equal(train_only.num_samples_per_domain, whole.num_samples_per_domain)
    np.testing.assert_allclose(mixer.current_weights, whole.num_samples_per_domain / whole.num_samples_per_domain.sum())


def test_training_feeds_the_bandit_and_logs(prefixes, tmp_path):
    args = make_args(prefixes, tmp_path)
    _, weights, mixer = train(args, 8)
    assert mixer.completed_steps == 8 and mixer.policy.num_updates == 4
    assert not np.allclose(mixer.latest_weights, [0.2, 0.3, 0.5]), "feedback never reached the policy"
    lines = [json.loads(x) for x in open(os.path.join(args.save, "odm", "mixture.jsonl"))]
    assert [x["step"] for x in lines] == [2, 4, 6, 8]  # 1-based: the last step of each window
    assert set(lines[0]["weights"]) == {"domain0", "domain1", "domain2"}


def test_ranks_split_each_global_batch(prefixes, tmp_path):
    single, _, _ = train(make_args(prefixes, tmp_path / "a"), 4)
    odm_lm.reset()
    r0, _, _ = train(make_args(prefixes, tmp_path / "b"), 4, dp_rank=0, dp_size=2)
    odm_lm.reset()
    r1, _, _ = train(make_args(prefixes, tmp_path / "c"), 4, dp_rank=1, dp_size=2)
    per_step = GBS // MBS
    for s in range(4):
        whole = sorted(map(str, single[s * per_step:(s + 1) * per_step]))
        halves = r0[s * 2:(s + 1) * 2] + r1[s * 2:(s + 1) * 2]
        assert sorted(map(str, halves)) == whole


def test_evaluation_and_tp_ranks_record_nothing(prefixes, tmp_path):
    _, mixer = odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path), TOKENIZER)
    loss, mask, ids = torch.ones(2, SEQ), torch.ones(2, SEQ), torch.tensor([0, 2])
    odm_lm.odm_loss_hook(loss, mask, ids, StandIn().eval())  # evaluation
    odm_lm.odm_loss_hook(loss, mask, None, StandIn())  # TP rank > 0: no ids
    assert int(mixer.accumulator.stats.abs().sum()) == 0
    odm_lm.odm_loss_hook(loss.view(-1), mask, ids, StandIn())  # Megatron may hand the losses flat
    assert mixer.accumulator.stats[1].tolist() == [SEQ, 0, SEQ]
    with pytest.raises(ValueError, match="cannot split"):
        odm_lm.odm_loss_hook(torch.ones(3, 5), torch.ones(3, 5), ids, StandIn())


def test_step_replayed_in_place_by_the_rerun_state_machine_counts_once(prefixes, tmp_path):
    """``--rerun-mode validate_results/report_stats`` re-executes a step in place: its losses count
    once. (The machine's own loop all-reduces on CUDA, so its states are set here as it would.)"""
    from megatron.core import rerun_state_machine as rsm

    _, mixer = odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path), TOKENIZER)
    loss, mask, ids = torch.full((2, SEQ), 2.0), torch.ones(2, SEQ), torch.tensor([0, 2])
    rsm.destroy_rerun_state_machine()
    rsm.initialize_rerun_state_machine(mode=rsm.RerunMode.VALIDATE_RESULTS)
    try:
        machine = rsm.get_rerun_state_machine()
        for state in (rsm.RerunState.INITIAL_RUN, rsm.RerunState.RERUNNING_IN_PLACE):
            machine.state = state
            odm_lm.odm_loss_hook(loss, mask, ids, StandIn())
        assert mixer.accumulator.stats[1].tolist() == [SEQ, 0, SEQ]  # the replay added nothing
        machine.state = rsm.RerunState.RERUNNING_FROM_CHECKPOINT  # a new job, restored mixer: counts
        odm_lm.odm_loss_hook(loss, mask, ids, StandIn())
        assert mixer.accumulator.stats[1].tolist() == [2 * SEQ, 0, 2 * SEQ]
    finally:
        rsm.destroy_rerun_state_machine()


def test_tap():
    assert odm_lm.tap(None) is None
    it = iter([{"tokens": torch.zeros(1)}])
    assert odm_lm.tap(it) is it  # ODM off: untouched
    assert odm_lm.dataset_id_of(it) is None


def test_prefetch_deeper_than_the_lag_is_refused(prefixes, tmp_path):
    args = make_args(prefixes, tmp_path, num_workers=4, odm_lag=1)
    dataset, _ = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    with pytest.raises(odm_lm.OdmConfigError, match="--num-workers"):
        odm_lm.build_odm_dataloader(dataset, args, dp_rank=0, dp_size=1)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("save_at", [4, 5])  # at a window boundary and mid-window
def test_resume_reproduces_stream_and_weights(prefixes, tmp_path, save_at):
    args = make_args(prefixes, tmp_path)
    full_tokens, full_weights, full = train(args, 8, save_at=save_at)
    full_state = full.state_dict()
    assert os.path.isfile(odm_lm.state_path(args.save, save_at))
    odm_lm.reset()
    resumed_args = make_args(prefixes, tmp_path, iteration=save_at, consumed_train_samples=save_at * GBS,
                             load=args.save, save=str(tmp_path / "ckpt2"))
    tokens, weights, resumed = train(resumed_args, 8)
    assert tokens == full_tokens[save_at * GBS // MBS:]
    assert weights == {s: w for s, w in full_weights.items() if s >= save_at}
    assert resumed.state_dict() == full_state


def test_resume_errors(prefixes, tmp_path):
    args = make_args(prefixes, tmp_path)
    train(args, 4, save_at=4)
    odm_lm.reset()
    with pytest.raises(odm_lm.OdmCheckpointError, match="no bandit state.*copy odm/iter_"):
        odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path, iteration=3, load=args.save), TOKENIZER)
    odm_lm.reset()
    with pytest.raises(odm_lm.OdmCheckpointError, match=r"^checkpoint 4 consumed 20 samples, not 4 x 8: online mixing needs a constant global batch size$"):
        odm_lm.build_odm_train_dataset(
            make_args(prefixes, tmp_path, iteration=4, consumed_train_samples=20, load=args.save), TOKENIZER)
    odm_lm.reset()
    with pytest.raises(odm_lm.OdmCheckpointError,
                       match=r"odm/iter_0000004\.json: cannot restore the bandit state: .*seed 11, this run uses seed 12"):
        odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path, iteration=4, consumed_train_samples=32,
                                                 load=args.save, seed=12), TOKENIZER)
    odm_lm.reset()
    _, mixer = odm_lm.build_odm_train_dataset(make_args(prefixes, tmp_path), TOKENIZER)
    with pytest.raises(odm_lm.OdmCheckpointError, match="^saving checkpoint 3 but the mixer has completed 0 steps; odm_step_end"):
        odm_lm.odm_save_state(args, 3)


def test_save_is_a_no_op_before_setup(tmp_path):
    assert odm_lm.odm_save_state(SimpleNamespace(save=str(tmp_path)), 3) is None  # e.g. checkpoint conversion


# -- what install() adds around Megatron-LM's own functions ---------------------------------------
def fake_loss_func(loss_mask, output_tensor, model=None):
    """pretrain_gpt.py's loss_func: the masked sum and the token count."""
    return (output_tensor.view(-1) * loss_mask.view(-1)).sum(), loss_mask.sum(), {}


def fake_forward_step(data_iterator, model):
    """pretrain_gpt.py's forward_step: get_batch keeps only the tensors it knows (no dataset_id),
    and the loss function is ``partial(loss_func, loss_mask, model=model)``."""
    import functools

    batch = next(data_iterator)
    losses = model(batch["tokens"])
    return losses, functools.partial(fake_loss_func, batch["loss_mask"], model=model)


def test_forward_step_feeds_the_bandit_in_training_and_validation_in_evaluation(prefixes, tmp_path):
    from odm_megatron.integrations.megatron_lm import hooks
    from odm_megatron.integrations.megatron_lm.evaluation import DomainValidation

    args = make_args(prefixes, tmp_path)
    dataset, mixer = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    state = hooks._Installed(adapter=None, policy_default=None)
    state.validation = DomainValidation(["domain0", "domain1", "domain2", "other"], mixer.domain_names, None,
                                        torch.device("cpu"))
    forward_step = odm_lm.wrap_forward_step(fake_forward_step, state)
    assert odm_lm.wrap_forward_step(forward_step, state) is forward_step  # wrapped once
    loader = odm_lm.build_odm_dataloader(dataset, args, dp_rank=0, dp_size=1)
    batch = next(iter(odm_lm.build_odm_dataloader(dataset, args, dp_rank=0, dp_size=1)))
    model = StandIn().train()
    output, loss_fn = forward_step(iter(loader), model)
    loss, tokens, _ = loss_fn(output)  # the script's loss is untouched
    assert torch.equal(loss, (output * batch["loss_mask"]).sum())
    tokens_by_domain = torch.zeros(3, dtype=torch.int64).index_add_(
        0, batch["dataset_id"], batch["loss_mask"].sum(1).to(torch.int64))
    assert mixer.accumulator.stats[1].tolist() == tokens_by_domain.tolist()  # the loss mask bound in the partial
    bandit = mixer.accumulator.stats.clone()
    model.eval()
    state.validation.start()
    output, loss_fn = forward_step(iter(loader), model)
    loss_fn(output)
    assert torch.equal(mixer.accumulator.stats, bandit), "evaluation fed the bandit"
    ids = next(iter(loader))["dataset_id"]  # the loader re-created from the same step draws the same batch
    sums = state.validation.sums
    np.testing.assert_allclose(sums[:3, 1].numpy(), np.bincount(ids.numpy(), minlength=3) * SEQ)
    assert sums[3].tolist() == [0.0, 0.0]


def test_forward_step_passes_through_without_mixing():
    seen = []

    def forward_step(data_iterator, model):
        seen.append(data_iterator)
        return "out", "loss"

    it = iter([])
    assert odm_lm.wrap_forward_step(forward_step, None)(it, StandIn()) == ("out", "loss")
    assert seen == [it]  # ODM off: the script's own iterator, untouched


def test_validation_record_by_domain_with_held_out(tmp_path):
    from odm_megatron.integrations.megatron_lm.evaluation import DomainValidation

    v = DomainValidation(["web", "code", "law"], ["web", "code", "books"], str(tmp_path), torch.device("cpu"))
    v.start()
    losses = torch.tensor([[1.0, 3.0], [2.0, 2.0], [4.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    v.add(losses, mask, torch.tensor([0, 1, 2]))
    v.add(losses[:1], mask[:1], torch.tensor([1]))
    v.collecting = False
    v.add(losses, mask, torch.tensor([0, 0, 0]))  # outside an evaluation: ignored
    record = v.finish(7)
    assert record["step"] == 7
    assert record["domains"] == {"web": {"loss": 2.0, "ppl": pytest.approx(np.exp(2.0)), "tokens": 2},
                                 "code": {"loss": 2.0, "ppl": pytest.approx(np.exp(2.0)), "tokens": 3}}
    assert record["token_weighted"]["loss"] == pytest.approx(2.0)
    assert record["held_out"] == {"law": {"loss": 4.0, "ppl": pytest.approx(np.exp(4.0)), "tokens": 2}}
    assert v.finish(7) is None  # Megatron's end-of-training validation at the same step: one record
    lines = [json.loads(x) for x in open(tmp_path / "eval.jsonl")]
    assert [x["step"] for x in lines] == [7]
    # A resumed run at step 5 drops what the first run logged after its checkpoint.
    DomainValidation(["web"], ["web"], str(tmp_path), torch.device("cpu"), resume_step=5)
    assert open(tmp_path / "eval.jsonl").read() == ""


def test_validation_of_a_single_prefix_has_no_dataset_id(tmp_path):
    from odm_megatron.integrations.megatron_lm.evaluation import DomainValidation

    v = DomainValidation(["web"], ["web"], None, torch.device("cpu"))
    v.start()
    v.add(torch.ones(2, 3), torch.ones(2, 3), None)  # megatron-core returns the GPTDataset itself
    assert v.finish(1)["domains"]["web"]["tokens"] == 6
    two = DomainValidation(["a", "b"], ["a", "b"], None, torch.device("cpu"))
    two.start()
    with pytest.raises(ValueError, match="validation batch without dataset_id, but 2 validation domains"):
        two.add(torch.ones(2, 3), torch.ones(2, 3), None)


def test_validation_domains_follow_megatrons_valid_split(tmp_path):
    from odm_megatron.integrations.megatron_lm.evaluation import valid_domain_names, valid_prefixes

    ns = SimpleNamespace
    assert valid_prefixes(ns(data_path=["0.3", "/d/web_text_document", "0.7", "/d/code"])) == [
        "/d/web_text_document", "/d/code"]
    assert valid_prefixes(ns(data_path=["/a"], valid_data_path=["1", "/v/law_text_document"])) == [
        "/v/law_text_document"]
    assert valid_prefixes(ns(data_path=None, train_data_path=["/t"], valid_data_path=None)) is None
    j = tmp_path / "per_split.json"
    j.write_text(json.dumps({"train": ["/t"], "valid": ["/v1", "/v2"]}))
    assert valid_prefixes(ns(per_split_data_args_path=str(j))) == ["/v1", "/v2"]
    # --odm-domain-names applies to a validation prefix that is also a training prefix
    assert valid_domain_names(["/d/web_text_document", "/x/law_text_document"], ["/d/web_text_document"],
                              ["internet"]) == ["internet", "law"]


def test_train_loader_iterator_leaves_the_global_rng_alone(prefixes, tmp_path):
    """Megatron creates its loaders' iterators after load_checkpoint; on CPU the global RNG is
    also dropout's, so a draw there would make a resumed CPU run differ from the uninterrupted one."""
    args = make_args(prefixes, tmp_path)
    dataset, _ = odm_lm.build_odm_train_dataset(args, TOKENIZER)
    loader = odm_lm.build_odm_dataloader(dataset, args, dp_rank=0, dp_size=1)
    before = torch.get_rng_state()
    iter(loader)
    assert torch.equal(before, torch.get_rng_state())


MAIN_SCRIPT = """
import multiprocessing, os, sys
with open(os.environ["MARKER"], "a") as f:
    f.write(__name__ + "\\n")
if __name__ == "__main__":
    assert sys.modules["__main__"].__file__ == os.path.abspath(sys.argv[0]), sys.argv
    assert sys.argv[1:] == ["--num-layers", "2"], sys.argv
    manager = multiprocessing.get_context("spawn").Manager()  # what torch_dist's writer does
    manager.Queue().put(1)
    manager.shutdown()
"""


def test_launcher_runs_the_script_as_main_without_spawn_children_reimporting_it(tmp_path, monkeypatch):
    """torch_dist's writer starts a spawn-context Manager; its child re-imports ``__main__`` by
    path unless ``__main__.__spec__`` names ``__main__``: the script, without the hooks."""
    from odm_megatron.integrations.megatron_lm import launcher

    script = tmp_path / "pretrain_fake.py"
    script.write_text(MAIN_SCRIPT)
    marker = tmp_path / "imports.txt"
    monkeypatch.setenv("MARKER", str(marker))
    monkeypatch.setattr(sys, "argv", [str(script), "--num-layers", "2"])
    main_before = sys.modules["__main__"]
    launcher._run_as_main(str(script))
    assert sys.modules["__main__"] is main_before
    assert marker.read_text().split() == ["__main__"]  # run once, as __main__; no __mp_main__ re-import


def test_launcher_refuses_a_missing_script_in_one_line(tmp_path, caplog):
    from odm_megatron.cli import main

    assert main(["megatron-lm", str(tmp_path / "nope.py"), "--num-layers", "2"]) == 2
    assert f"{tmp_path / 'nope.py'}: no such script" in caplog.text


def test_pretrain_gpt_refuses_megatron_core_without_megatron_training(caplog):
    """megatron-core 0.16's wheel has no megatron.training: one line saying what to do."""
    from odm_megatron.cli import main
    from odm_megatron.integrations.megatron_lm import adapters

    if adapters.detect().wheel_has_training:
        pytest.skip("this megatron-core ships megatron.training")
    assert main(["pretrain-gpt", "--num-layers", "2"]) == 2
    assert "odm-megatron pretrain-gpt needs Megatron-LM's training package, which the megatron-core wheel ships " \
           "from 0.17 (Python 3.12); found megatron-core 0.16" in caplog.text


def test_install_after_the_script_imported_pretrain_warns(monkeypatch, caplog):
    """``from megatron.training import pretrain`` before ``install()`` keeps the unwrapped function."""
    from odm_megatron.integrations.megatron_lm import adapters, hooks

    def pretrain():
        pass

    state = hooks._Installed(adapter=adapters.detect("0.16.1"), policy_default=None)
    state.originals.append((None, "pretrain", pretrain))
    monkeypatch.setattr(sys.modules["__main__"], "pretrain", pretrain, raising=False)
    hooks._warn_if_imported_before(state)
    assert "imported pretrain from Megatron-LM: call install() before importing megatron.training" in caplog.text
    caplog.clear()
    monkeypatch.delattr(sys.modules["__main__"], "pretrain")
    hooks._warn_if_imported_before(state)
    assert caplog.text == ""


def test_dataset_provider_is_distributed_only_when_mixing(monkeypatch):
    """The mixer must exist on every rank (its step end is collective), so with --odm-policy the
    provider runs everywhere; without it, the script's own choice stands."""
    from odm_megatron.integrations.megatron_lm import hooks

    def provider(num_samples, vp_stage=None):
        return "train", "valid", "test"

    wrapped = odm_lm.wrap_dataset_provider(provider, None)
    assert odm_lm.wrap_dataset_provider(wrapped, None) is wrapped
    assert "vp_stage" in __import__("inspect").signature(wrapped).parameters  # Megatron checks it for VPP
    monkeypatch.setattr(hooks, "_args", lambda: SimpleNamespace(odm_policy=None))
    assert wrapped.is_distributed is False
    assert wrapped([8, 2, 2]) == ("train", "valid", "test")  # mixing off: the script's datasets
    monkeypatch.setattr(hooks, "_args", lambda: SimpleNamespace(odm_policy="odm-exp3"))
    assert wrapped.is_distributed is True
    provider.is_distributed = True
    monkeypatch.setattr(hooks, "_args", lambda: SimpleNamespace(odm_policy=None))
    assert wrapped.is_distributed is True


def test_cpu_standins_never_touch_a_gpu_run(monkeypatch):
    from odm_megatron.integrations.megatron_lm import cpu_standins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = (torch.cuda.device_count, torch.cuda.synchronize, torch.Tensor.type, dict(sys.modules))
    assert cpu_standins.apply() is False
    assert (torch.cuda.device_count, torch.cuda.synchronize, torch.Tensor.type) == before[:3]
    assert cpu_standins.BATCH_INVARIANT not in set(sys.modules) - set(before[3])


def test_cuda_tensors_stay_on_the_cpu_under_the_standin_mode():
    from odm_megatron.integrations.megatron_lm.cpu_standins import CudaToCpu

    with CudaToCpu():
        made = torch.zeros(2, device="cuda")
        moved = torch.ones(2).cuda()
        to = torch.ones(2).to("cuda", non_blocking=True)
        to_device = torch.ones(2).to(torch.device("cuda", 0))
    assert {t.device.type for t in (made, moved, to, to_device)} == {"cpu"}
    assert torch.equal(to, torch.ones(2))
