"""The benchmark scripts run end to end (tiny sizes) and write the documented keys.

Timing values are never checked: they depend on the machine and its load.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_benchmark(script, *args, timeout=600):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "ignore"
    return subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead"
    proc = _run_benchmark("overhead.py", "--smoke", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "overhead.json").read_text(encoding="utf-8"))
    assert (out / "overhead.md").read_text(encoding="utf-8").startswith("# What does online mixing cost?")

    assert report["mode"] == "smoke"
    assert isinstance(report["data_path_ratio"], float)
    for key in ("update_cost_fraction", "accumulate_cost_fraction", "update_cost_fraction_amortized"):
        assert set(report[key]) == {"22", "1000"}, key
        assert all(isinstance(v, float) for v in report[key].values()), key
    assert set(report["index_memory_bytes"]) == {"online", "blended"}
    assert all(isinstance(v, int) and v > 0 for v in report["index_memory_bytes"].values())
    assert set(report["index_build_seconds"]) == {"online", "blended"}
    assert {"nproc", "cpu_model", "torch"} <= set(report["machine"])
    assert {"start", "end"} <= set(report["load_average"])
    assert report["date"] and report["command"].startswith("python benchmarks/overhead.py")
    assert {"data_path", "model", "feedback", "blended_index", "online_index"} <= set(report["raw"])
    assert "one_b_estimate" in report and "targets" in report


def test_learning_efficiency_smoke(tmp_path):
    """Tokenizer, preprocessing, three short training runs and the analysis, on a synthetic corpus."""
    out = tmp_path / "le"
    proc = _run_benchmark("learning_efficiency.py", "--smoke", "--output", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "learning_efficiency.json").read_text(encoding="utf-8"))
    from odm_megatron.policy import DEFAULT_POLICY

    assert report["default_policy"] == DEFAULT_POLICY
    assert set(report["policies"]) == {"natural", "uniform", "odm-exp3", "fitted-static"}
    fitted = json.loads((out / "_smoke_work" / "fitted_static_mix.json").read_text())
    assert set(fitted) == {"Pile-CC", "Github", "DM Mathematics"} and abs(sum(fitted.values()) - 1) < 1e-9
    assert report["fitted_static_mix"]["shares"] == fitted and report["best_online_policy"] == "odm-exp3"
    for name, entry in report["policies"].items():
        assert len(entry["final_avg_val_ppl"]["per_seed"]) == 1 and entry["final_avg_val_ppl"]["mean"] > 1
    online = report["policies"]["odm-exp3"]
    for key in ("steps_fraction_to_natural", "steps_fraction_to_best_static"):
        assert {"per_seed", "mean"} <= set(online[key])
    assert (out / "learning_efficiency.md").read_text().startswith("# Learning efficiency")
    assert (out / "learning_efficiency_avg_ppl.png").stat().st_size > 0


def test_steps_to_reach_interpolates_between_evaluations():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from learning_efficiency import steps_to_reach

    curve = [(100, 500.0), (200, 300.0), (300, 250.0)]
    assert steps_to_reach(curve, 400.0) == 150.0
    assert steps_to_reach(curve, 600.0) == 100.0
    assert steps_to_reach(curve, 250.0) == 300.0
    assert steps_to_reach(curve, 249.0) is None


def test_fitted_static_mix_recovers_the_optimum_of_its_model():
    """Perplexities made by the model itself: the fit recovers the elasticities, lands on the
    optimality condition, beats uniform; a domain with the same share in both runs is not fitted."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from learning_efficiency import fitted_static_mix

    names = ["a", "b", "c", "d"]
    natural_shares = {"a": 0.6, "b": 0.1, "c": 0.05, "d": 0.25}
    true_e = {"a": 0.6, "b": 0.2, "c": 0.4, "d": 0.3}
    uniform = {"a": 200.0, "b": 300.0, "c": 400.0, "d": 250.0}
    natural = {n: uniform[n] * (natural_shares[n] / 0.25) ** (-true_e[n]) for n in names}
    natural["d"] = 260.0  # same share in both runs: the difference is not its own doing, not fitted
    fit = fitted_static_mix(natural, uniform, natural_shares)
    for n in "abc":
        assert abs(fit["elasticity"][n] - true_e[n]) < 1e-9
    assert fit["elasticity_not_identified"] == ["d"] and fit["elasticity"]["d"] == 0.4
    s = fit["shares"]
    assert abs(sum(s.values()) - 1) < 1e-9
    marginal = [fit["elasticity"][n] * uniform[n] * (s[n] / 0.25) ** (-fit["elasticity"][n]) / s[n] for n in names]
    assert max(marginal) / min(marginal) < 1 + 1e-6
    assert fit["predicted_avg_ppl"] < fit["predicted_uniform_avg_ppl"] == sum(uniform.values()) / 4


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import pytest
    from learning_efficiency import build_parser, run_one, train_flags

    log_dir = tmp_path / "runs" / "uniform" / "seed1"
    log_dir.mkdir(parents=True)
    (log_dir / "DONE").write_text("12.0\n")
    args = build_parser().parse_args(["--train-iters", "600"])
    config = {"policy": "static", "prior": "uniform", "seed": 1, "flags": train_flags(args)}
    (log_dir / "run_config.json").write_text(json.dumps(config))
    assert run_one(args, {}, str(tmp_path), "uniform", 1) == str(log_dir)  # same settings: reused
    other = build_parser().parse_args(["--train-iters", "1200"])
    with pytest.raises(SystemExit, match="made with other settings"):
        run_one(other, {}, str(tmp_path), "uniform", 1)
