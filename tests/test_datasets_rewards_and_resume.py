"""Datasets, reward models and the win-rate, and kill-and-resume, proven on the CPU."""

import glob
import json
import math
import os
import shutil
import signal
import time
import uuid

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import async_online_dpo as A
from conftest import ROOT, gone_within, max_difference, read_run, run_script, start, weights


def test_sigkill_then_resume_equals_an_uninterrupted_run(cache_dir, tmp_path):
    """IPO with the off-policy correction, in rounds of N = 2 batches, one round ahead: batch i is sampled by version
    max(0, 2 (i // 2 - 1)), so a checkpoint at version 4 holds batches 4 and 5, sampled by version 2. Version 3 starts
    no round, but is pushed to be evaluated."""
    flags = "--num_steps 6 --batch_size 8 --micro_batch_size 4 --eval_every 3 --eval_prompts 16 --save_every 2".split()
    flags += "--loss_type ipo --batches_per_round 2 --tis_cap 2".split()
    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "whole", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    whole_dir, whole_steps, whole_evals = read_run(tmp_path / "whole")
    check_the_correction_by_hand(whole_steps, cap=2.0)

    marker = uuid.uuid4().hex
    p = start("async_online_dpo.py", cache_dir, tmp_path / "killed", *flags, marker=marker)
    deadline = time.time() + 240
    while not glob.glob(str(tmp_path / "killed" / "*" / "checkpoint-000004")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)  # no chance to clean up
    p.communicate()
    (run_dir,) = glob.glob(str(tmp_path / "killed" / "*"))
    assert gone_within(30, marker)  # the generator noticed and stopped by itself
    # A save that was cut short leaves only a temporary folder, which resume must ignore.
    shutil.copytree(os.path.join(run_dir, "checkpoint-000004"), os.path.join(run_dir, ".tmp-checkpoint-000006"))
    os.truncate(os.path.join(run_dir, ".tmp-checkpoint-000006", "trainer.pt"), 100)

    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "unused", "--resume", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-000004" in result.stdout  # it started from the newest complete checkpoint
    _, steps, evals = read_run(tmp_path / "killed")
    assert [s["step"] for s in steps] == list(range(6))  # nothing lost, nothing logged twice
    assert [s["async/batch_version"] for s in steps] == [s["async/batch_version"] for s in whole_steps]
    assert [s["async/batch_version"] for s in steps] == [0, 0, 0, 0, 2, 2]  # lags 0, 1, 2, 3, 2, 3
    assert [e["eval/version"] for e in evals] == [0, 3, 6]
    assert [e["eval/gold_reward"] for e in evals] == [e["eval/gold_reward"] for e in whole_evals]
    assert max_difference(weights(whole_dir), weights(run_dir)) < 1e-6
    # Checkpoints are named as implementation detail 22 says: the version in six digits, and only the newest is kept.
    assert [os.path.basename(c) for c in glob.glob(os.path.join(run_dir, "checkpoint-*"))] == ["checkpoint-000006"]
    details = open(os.path.join(ROOT, "docs", "implementation_details.md")).read()
    assert "`checkpoint-000016/` (the policy version, six digits)" in details and "only the newest is kept" in details


def check_the_correction_by_hand(steps, cap):
    """Each logged pair's ratio is min(cap, exp(log π_θ - log μ)) of its own logged log-probs; it is 1 up to float error
    at lag 0, where the trainer holds the weights that sampled, and moves off 1 at a lag; the step's mean is theirs."""
    for step in steps:
        assert step["pairs"], step  # every step of this run has pairs whose scores differ
        for trained, sampled, ratio in step["pairs"]:
            assert ratio == pytest.approx(min(cap, math.exp(trained - sampled)), rel=1e-5)
        ratios = [ratio for _, _, ratio in step["pairs"]]
        assert step["offpolicy/tis_ratio"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-6)
        if step["async/lag"] == 0:
            assert max(abs(r - 1) for r in ratios) < 1e-3, step["pairs"]
    stale = [abs(r - 1) for step in steps if step["async/lag"] > 0 for _, _, r in step["pairs"]]
    assert max(stale) > 0.01  # this test could not fail if the ratio stayed 1


def make_reward_model(path, seed):
    """A tiny untrained reward model whose tokenizer differs from the policy's: other ids, other vocabulary size."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "#": 3} | {c: 10 + i for i, c in enumerate(reversed(A.LETTERS + "="))}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer._tokenizer.decoder = decoders.Fuse()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=0,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_reads_text_with_its_own_tokenizer(model_path, tmp_path):
    path = make_reward_model(tmp_path / "rm", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = tokenizer.eos_token_id
    score = A.load_reward(A.Args(micro_batch_size=2), path, "cpu", tokenizer, eos_ids={eos})
    prompts, completions, ended = ["dcba=", "zyx=", "qwerty="], ["abcd", "xyz", "eqrtwy"], [True, False, True]
    responses = [ids + [eos] * e for ids, e in zip(A.tokenize(tokenizer, completions), ended)]
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    rm_tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    with torch.no_grad():  # one at a time, no padding: the reference. A completion that ended gets the RM's EOS.
        expected = [
            model(torch.tensor([rm_tokenizer(p + c)["input_ids"] + [rm_tokenizer.eos_token_id] * e]))
            .logits[0, 0]
            .item()
            for p, c, e in zip(prompts, completions, ended)
        ]
    assert score(prompts, A.tokenize(tokenizer, prompts), responses) == pytest.approx(expected, abs=1e-5)


def test_dataset_reward_models_and_win_rate(cache_dir, model_path, tmp_path):
    rows = [
        {"prompt": p, "reference": "".join(sorted(p[:-1])), "id": i}
        for i, p in enumerate(A.builtin_prompts(A.random.Random(7), 48))
    ]
    with open(tmp_path / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    reward, gold = make_reward_model(tmp_path / "rm", seed=0), make_reward_model(tmp_path / "gold", seed=1)
    flags = ["--dataset", str(tmp_path / "data.jsonl"), "--reference_column", "reference", "--eval_prompts", "8"]
    flags += ["--reward_model_path", reward, "--gold_reward_model_path", gold]
    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "out", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path / "out")
    assert len(steps) == 4 and [e["eval/version"] for e in evals] == [0, 2, 4]
    held_out = {r["prompt"] for r in rows[-8:]}  # the last --eval_prompts rows are held out of training
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {s["prompt"] for s in samples} <= held_out
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = tokenizer.eos_token_id
    gold_score = A.load_reward(A.Args(), gold, "cpu", tokenizer, eos_ids={eos})
    for s in samples:  # evaluation used the gold reward model, not the training one
        response = A.tokenize(tokenizer, [s["completion"]])[0] + [eos] * s["eos"]
        assert s["gold"] == pytest.approx(
            gold_score([s["prompt"]], A.tokenize(tokenizer, [s["prompt"]]), [response])[0], abs=1e-4
        )
    # The win-rate, recomputed: the first and the last policy's greedy completions of every held-out prompt, made
    # here with transformers, against the references, both scored by the gold model; a tie counts one half.
    prompts = [r["prompt"] for r in rows[-8:]]
    prompt_ids = A.tokenize(tokenizer, prompts)
    ref_ids = [ids + [eos] for ids in A.tokenize(tokenizer, [r["reference"] for r in rows[-8:]])]
    ref_gold = gold_score(prompts, prompt_ids, ref_ids)
    for version, policy_path in [(0, model_path), (4, os.path.join(run_dir, "model"))]:
        policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
        greedy = [
            policy.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)[
                0, len(ids) :
            ].tolist()
            for ids in prompt_ids
        ]
        gold = gold_score(prompts, prompt_ids, greedy)
        wins = [(g > r) + 0.5 * (g == r) for g, r in zip(gold, ref_gold)]
        (logged,) = [e["eval/win_rate"] for e in evals if e["eval/version"] == version]
        assert logged == pytest.approx(sum(wins) / len(wins)), version
    # ...and it is printed with each evaluation, and kept in summary.json, as the gold reward is.
    printed = [line for line in result.stdout.splitlines() if line.startswith("eval  policy")]
    assert [f"win rate {e['eval/win_rate']:.3f}" in line for e, line in zip(evals, printed, strict=True)] == [True] * 3
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert [summary["eval_win_rate_start"], summary["eval_win_rate_end"]] == [
        evals[0]["eval/win_rate"],
        evals[-1]["eval/win_rate"],
    ]
