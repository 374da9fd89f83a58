"""``install()`` against the real ``megatron/training`` of every supported Megatron-LM release.

Each release's tree (``megatron/`` and ``pretrain_gpt.py`` from the Megatron-LM git mirror, or
``MEGATRON_LM_DIR``) is imported in a subprocess with the tree first on ``sys.path``, as the
launcher does; ``install()`` runs there and the check reports, as JSON, which names are wrapped
and what Megatron-LM's own parser made of ``--odm-*`` flags when reached through the release's
entry point (``pretrain(extra_args_provider=...)`` up to 0.17, ``parse_and_validate_args`` from
0.18), plus the dataset provider and forward step that ``pretrain`` received. Nothing is trained
(``tests/test_megatron_lm_real_loop.py`` does that). A tree whose imports need a package this
environment lacks is skipped, naming it: from 0.18 ``megatron.core`` imports triton at module
level, which CPU-only torch builds lack (the README's Python 3.11 stack checks 0.16.1 and 0.17.1;
the Python 3.12 stack, whose torch brings triton, checks 0.17.1 to main).
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from odm_megatron.integrations.megatron_lm import adapters

MIRROR = os.environ.get("MEGATRON_LM_MIRROR", "/work/.mirror/NVIDIA+Megatron-LM/repo")
RELEASES = {  # tag or commit -> adapter series
    "core_v0.16.1": "0.16", "core_v0.17.1": "0.17", "core_v0.18.2": "0.18", "core_v0.19.0": "0.19",
    "d98e8a6": "0.20",
}

CHECK = textwrap.dedent(r'''
    import inspect, json, sys
    from odm_megatron.integrations import megatron_lm as odm_lm

    adapter = odm_lm.install()
    import megatron.training as package
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    names = [adapter.pretrain, adapter.train_step, adapter.dummy_train_step, adapter.save_checkpoint,
             adapter.data_loader, adapter.evaluate]
    report = {"series": adapter.series, "core": sys.modules["megatron.core"].__file__,
              "wrapped": {n: bool(getattr(getattr(training, n), "__odm_wrapped__", False)) for n in names}}
    report["wrapped"]["megatron.training.pretrain"] = bool(getattr(package.pretrain, "__odm_wrapped__", False))

    class Reached(Exception):
        pass

    real_parse_args = arguments.parse_args
    seen = {}

    def fake_initialize_megatron(extra_args_provider=None, **kwargs):  # stands in inside pretrain()
        caller = sys._getframe(1).f_locals
        seen["provider"] = getattr(caller["train_valid_test_dataset_provider"], "__odm_wrapped__", False)
        seen["provider_distributed"] = getattr(caller["train_valid_test_dataset_provider"], "is_distributed", False)
        seen["forward_step"] = getattr(caller["forward_step_func"], "__odm_wrapped__", False)
        if extra_args_provider is not None:
            seen["args"] = real_parse_args(extra_args_provider, ignore_unknown_args=True)
        raise Reached()

    def fake_parse_args(extra_args_provider=None, ignore_unknown_args=False):  # inside parse_and_validate_args
        seen["args"] = real_parse_args(extra_args_provider, ignore_unknown_args)
        raise Reached()

    def provider(num_samples, vp_stage=None):
        pass

    provider.is_distributed = True  # as pretrain_gpt.py sets it

    def forward_step(data_iterator, model):
        pass

    training.initialize_megatron = fake_initialize_megatron
    sys.argv = ["pretrain_gpt.py", "--odm-policy", "smoothed-mean", "--odm-prior", "uniform"]
    if adapter.args_function != adapter.pretrain:
        arguments.parse_args = fake_parse_args
        try:
            getattr(arguments, adapter.args_function)(args_defaults={})
        except Reached:
            pass
        arguments.parse_args = real_parse_args
    pieces = dict(train_valid_test_dataset_provider=provider, model_provider=None, model_type=None,
                  forward_step_func=forward_step)
    first = {"cfg_container": None} if "cfg_container" in inspect.signature(package.pretrain).parameters else {}
    try:
        package.pretrain(*first.values(), **pieces)
    except Reached:
        pass
    args = seen.pop("args")
    report.update(seen, odm_policy=args.odm_policy, odm_prior=args.odm_prior)
    odm_lm.uninstall()
    report["restored"] = not getattr(training.train_step, "__odm_wrapped__", False)
    print("REPORT " + json.dumps(report))
''')


def _tree(tmp_path_factory, ref):
    """``megatron/`` and ``pretrain_gpt.py`` of ``ref`` (git archive from the mirror: < 1 s)."""
    if os.environ.get("MEGATRON_LM_DIR") and ref == "core_v0.16.1":
        return os.environ["MEGATRON_LM_DIR"]
    if not os.path.isdir(MIRROR):
        pytest.skip(f"no Megatron-LM git mirror at {MIRROR} (set MEGATRON_LM_MIRROR)")
    out = tmp_path_factory.mktemp(f"mlm-{ref}")
    archive = subprocess.run(["git", "-C", MIRROR, "archive", ref, "megatron", "pretrain_gpt.py"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


@pytest.mark.parametrize("ref", list(RELEASES))
def test_install_wraps_each_release(tmp_path_factory, ref):
    series = RELEASES[ref]
    tree = _tree(tmp_path_factory, ref)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]),
               TORCHDYNAMO_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=tree, timeout=300)
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", out.stderr)
    if out.returncode != 0 and missing and not missing.group(1).startswith(("megatron", "odm_megatron")):
        pytest.skip(f"Megatron-LM {ref}'s training package needs {missing.group(1)!r}, not installed here")
    lines = [line for line in out.stdout.splitlines() if line.startswith("REPORT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["series"] == series
    assert report["core"].startswith(tree), "the tree's megatron.core must win over the installed wheel"
    assert all(report["wrapped"].values()), report["wrapped"]
    assert report["provider"] and report["provider_distributed"] and report["forward_step"]
    assert (report["odm_policy"], report["odm_prior"]) == ("smoothed-mean", "uniform")  # Megatron's own parser
    assert report["restored"]


def test_adapter_table_per_release():
    assert adapters.detect("0.16.1").args_function == "pretrain"
    assert adapters.detect("0.17.1").args_function == "pretrain"
    for version in ("0.18.2", "0.19.1", "0.19.2", "0.20.0"):
        adapter = adapters.detect(version)
        assert (adapter.args_module, adapter.args_function) == ("megatron.training.arguments", "parse_and_validate_args")
        assert adapter.cfg_container == "megatron.training.argument_utils:pretrain_cfg_container_from_args"
    assert not adapters.detect("0.16.1").wheel_has_training and adapters.detect("0.17.1").wheel_has_training


def test_unsupported_release_is_refused_in_one_line():
    with pytest.raises(adapters.UnsupportedMegatronError) as e:
        adapters.detect("0.15.3")
    message = str(e.value)
    assert message == (
        "odm-megatron's Megatron-LM integration does not support megatron-core 0.15.3; supported: "
        "0.16.x (core_v0.16.1), 0.17.x (core_v0.17.1), 0.18.x (core_v0.18.2), "
        "0.19.x (core_v0.19.0 (package_info 0.19.1), wheel 0.19.2), 0.20.x (main at d98e8a6 (package_info 0.20.0)) "
        "(put a supported Megatron-LM checkout first on PYTHONPATH)")
    assert isinstance(e.value, ValueError)


def test_detects_the_imported_megatron_core():
    import megatron.core.package_info as info

    assert adapters.detect().series == f"{info.MAJOR}.{info.MINOR}"
