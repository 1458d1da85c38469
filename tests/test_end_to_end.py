"""Both scripts, run as a user runs them (through subprocess), with tiny settings and real vLLM."""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ROOT, SFT_STEPS

TINY = "--num_steps 4 --batch_size 8 --micro_batch_size 4 --eval_every 2 --eval_prompts 16".split()
TINY += ["--sft_steps", str(SFT_STEPS)]


def run_script(script, cache_dir, output_dir, *flags, timeout=300):
    places = ["--cache_dir", cache_dir, "--output_dir", str(output_dir)]
    cmd = [sys.executable, os.path.join(ROOT, script), *TINY, *places, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_run(output_dir):
    (run_dir,) = glob.glob(os.path.join(output_dir, "*"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "step" in r]
    evals = [r for r in rows if "eval/version" in r]
    return run_dir, steps, evals


def check_reloads(steps):
    """After every load of pushed weights, vLLM agreed with the trainer on the probe completion."""
    reloads = [r["async/reload_gap"] for r in steps if not math.isnan(r["async/reload_gap"])]
    assert reloads and all(gap < 1e-4 for gap in reloads), reloads


def check_run_folder(run_dir, steps, evals, initial_model, num_steps=4):
    assert [r["step"] for r in steps] == list(range(num_steps))
    assert [e["eval/version"] for e in evals] == [0, 2, 4]  # start, every --eval_every, end
    assert all(0 <= e["eval/gold_reward"] <= 1 and "eval/kl" in e for e in evals)
    assert json.load(open(os.path.join(run_dir, "args.json")))["num_steps"] == num_steps
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {"version", "prompt", "completion", "gold"} <= set(samples[0])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["lags"] == [r["async/lag"] for r in steps]
    assert summary["generate_per_step"] > 0 and summary["train_per_step"] > 0
    assert summary["snapshot_gb"] > 0 and summary["push_gb_per_s"] > 0 and summary["load_gb_per_s"] > 0
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"))  # loads back...
    initial = AutoModelForCausalLM.from_pretrained(initial_model)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert sum(changed) > len(changed) // 2  # ...and training changed it
    return summary


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
