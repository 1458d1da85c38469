"""Both scripts, run as a user runs them (through subprocess), with tiny settings and real vLLM."""

import json
import math
import os

import pytest

from conftest import ROOT, check_reloads, check_run_folder, read_run, run_script


def check_async_lags_and_gaps(steps, async_steps: int):
    lags = [r["async/lag"] for r in steps]
    # Batch 0 can only come from the initial policy (lag 0). The generator starts each next batch the moment it has
    # sent one, long before the trainer can finish an update, so every later batch is off-policy by at least one
    # update, and never by more than A.
    assert lags[0] == 0 and all(1 <= lag <= async_steps for lag in lags[1:]), lags
    # The weight-sync check: at lag 0 vLLM's log-probs of the sampled tokens are the trainer's; a batch sampled by
    # an older policy is off-policy, by a measurable gap.
    gaps = [r["async/logprob_gap"] for r in steps]
    assert gaps[0] < 1e-4 and all(gap > 1e-3 for gap in gaps[1:]), gaps
    check_reloads(steps)


def test_async_run(tiny_run, model_path):
    check_run_folder(tiny_run.run_dir, tiny_run.steps, tiny_run.evals, model_path)
    check_async_lags_and_gaps(tiny_run.steps, async_steps=1)
    assert "step   4/4" in tiny_run.result.stdout and "overlap speedup" in tiny_run.result.stdout
    # What a run prints on stderr is worth reading: no warning about Triton, which the CPU install leaves out, and the
    # docs/metrics.md says what the one warning left (vLLM's NUMA binding) means.
    assert "Triton not available" not in tiny_run.result.stderr
    if "NUMA binding" in tiny_run.result.stderr:
        assert "Warning: NUMA binding: Using MEMBIND policy" in open(os.path.join(ROOT, "docs", "metrics.md")).read()


def test_online_dpo_starts_at_the_reference(tiny_run):
    """At step 0 the policy is the reference: every pair's log-ratio difference is 0 up to float error, so DPO's
    implicit reward margin is 0 and its loss log 2."""
    first = tiny_run.steps[0]
    assert abs(first["rewards/dpo_margin"]) < 1e-5 and first["objective/loss"] == pytest.approx(math.log(2), abs=1e-5)
    for s in tiny_run.steps:
        assert s["logps/chosen"] < 0 and s["logps/rejected"] < 0 and 0 <= s["rewards/dpo_accuracy"] <= 1
    assert any(s["rewards/dpo_margin"] > 0 for s in tiny_run.steps[1:])  # the policy learns to prefer the chosen


def test_sync_run(sync_run, bos_model):
    """sync_baseline.py, on a dataset and with a tokenizer that adds BOS (implementation detail 11: one BOS)."""
    check_run_folder(sync_run.run_dir, sync_run.steps, sync_run.evals, bos_model)
    assert [r["async/lag"] for r in sync_run.steps] == [0, 0, 0, 0]
    assert all(r["async/logprob_gap"] < 1e-4 for r in sync_run.steps)  # vLLM serves each pushed version exactly
    check_reloads(sync_run.steps)
    assert os.path.basename(sync_run.run_dir).startswith("sync_baseline__")


def test_own_model_and_reward_function_two_rounds_ahead(cache_dir, model_path, tmp_path):
    """Any local transformers model folder and any module:function reward work in place of the defaults; here with
    the generator two batches ahead (--async_steps 2)."""
    flags = ["--model_name_or_path", model_path, "--reward_fn", "tests.my_rewards:count_a", "--async_steps", "2"]
    result = run_script("async_online_dpo.py", cache_dir, tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {model_path}" in result.stdout
    run_dir, steps, evals = read_run(tmp_path)
    check_run_folder(run_dir, steps, evals, model_path)
    check_async_lags_and_gaps(steps, async_steps=2)
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    for s in samples:  # the logged gold reward is the user's function, not the built-in one
        assert s["gold"] == s["completion"].count("a") / max(1, len(s["completion"]))
