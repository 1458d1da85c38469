"""Both scripts, run as a user runs them (through subprocess), with tiny settings and real vLLM."""

import json
import os

import pytest

from conftest import check_reloads, check_run_folder, read_run, run_script


@pytest.mark.parametrize("async_steps", [1, 2])
def test_async_run(cache_dir, model_path, tmp_path, async_steps):
    result = run_script("async_online_dpo.py", cache_dir, tmp_path, "--async_steps", str(async_steps))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path)
    check_run_folder(run_dir, steps, evals, model_path)
    lags = [r["async/lag"] for r in steps]
    # Batch 0 can only come from the initial policy (lag 0). The generator starts each next batch the
    # moment it has sent one, long before the trainer can finish an update, so every later batch is
    # off-policy by at least one update, and never by more than N.
    assert lags[0] == 0 and all(1 <= lag <= async_steps for lag in lags[1:]), lags
    # The weight-sync check: at lag 0 vLLM's log-probs of the sampled tokens are the trainer's; a batch sampled by
    # an older policy is off-policy, by a measurable gap.
    gaps = [r["async/logprob_gap"] for r in steps]
    assert gaps[0] < 1e-4 and all(gap > 1e-3 for gap in gaps[1:]), gaps
    check_reloads(steps)
    assert "step   4/4" in result.stdout and "overlap speedup" in result.stdout


def test_sync_run(cache_dir, model_path, tmp_path):
    result = run_script("sync_baseline.py", cache_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path)
    check_run_folder(run_dir, steps, evals, model_path)
    assert [r["async/lag"] for r in steps] == [0, 0, 0, 0]
    assert all(r["async/logprob_gap"] < 1e-4 for r in steps)  # vLLM serves each pushed version exactly
    check_reloads(steps)
    assert os.path.basename(run_dir).startswith("sync_baseline__")


def test_own_model_and_reward_function(cache_dir, model_path, tmp_path):
    """Any local transformers model folder and any module:function reward work in place of the defaults."""
    result = run_script(
        "async_online_dpo.py",
        cache_dir,
        tmp_path,
        "--model_name_or_path",
        model_path,
        "--reward_fn",
        "tests.my_rewards:count_a",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {model_path}" in result.stdout
    run_dir, steps, evals = read_run(tmp_path)
    check_run_folder(run_dir, steps, evals, model_path)
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    for s in samples:  # the logged gold reward is the user's function, not the built-in one
        assert s["gold"] == s["completion"].count("a") / max(1, len(s["completion"]))
