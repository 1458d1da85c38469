"""The paper's off-policy study with real vLLM: several updates per batch and the built-in policy's sizes. RLOO and
the paper's N run end to end in tests/test_study.py, IPO in rounds of two batches in
tests/test_datasets_rewards_and_resume.py."""

import math
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import async_online_dpo as A
from conftest import check_reloads, check_run_folder, read_run, run_script


def check_kl(steps, evals):
    """The KL is the sampling policy's to the reference: version 0 is the reference, so float error; later, not."""
    assert abs(evals[0]["eval/kl"]) < 1e-4 and abs(steps[0]["objective/kl"]) < 1e-4, (evals[0], steps[0])
    assert evals[-1]["eval/kl"] > 1e-3


def test_best_of_k_with_two_updates_per_batch(cache_dir, model_path, tmp_path):
    """E = 2 optimizer updates on every batch; the learning rate decays to 0 over all of them; the weights are pushed
    once per batch, so the staleness rule still counts batches."""
    flags = "--loss_type best_of_k --updates_per_batch 2 --save_every 4".split()
    result = run_script("async_online_dpo.py", cache_dir, tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path)
    check_run_folder(run_dir, steps, evals, model_path)
    assert [s["async/lag"] for s in steps] == [0, 1, 1, 1]
    lr = A.Args().learning_rate
    assert [s["objective/lr"] for s in steps] == pytest.approx([lr * (1 - 2 * step / 8) for step in range(4)])
    for s in steps:  # the loss is the chosen completions' negative log-likelihood
        assert s["objective/loss"] == pytest.approx(-s["logps/chosen"], rel=1e-5)
    state = torch.load(os.path.join(run_dir, "checkpoint-000004", "trainer.pt"), weights_only=False)
    assert state["scheduler"]["last_epoch"] == 8  # 4 batches x 2 updates
    assert all(s["step"] == 8 for s in state["optimizer"]["state"].values())  # AdamW's step count, per weight
    check_reloads(steps)
    check_kl(steps, evals)


def test_the_builtin_sizes_have_the_parameters_they_are_named_for():
    counts = {}
    for name, size in A.BUILTIN_SIZES.items():
        config = LlamaConfig(vocab_size=29, max_position_embeddings=64, tie_word_embeddings=False, **size)
        counts[name] = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6
    assert counts == pytest.approx({"3m": 2.7, "10m": 10.6, "30m": 29.0}, abs=0.05)


def test_the_kl_of_an_evaluation_is_the_sampling_policys_log_ratio_to_the_reference():
    """measure_kl: mean over prompts of Σ_t log π_v - log π_ref of the sampled completion. A policy that is the
    reference gives 0; one whose log-probs are higher by 0.1 per token gives 0.1 per token, averaged over prompts.
    An evaluation kept by an older version's checkpoint has no samples: its KL is left unknown."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    ref = LlamaForCausalLM(config).eval()
    args = A.Args(temperature=0.7, micro_batch_size=1)  # two completions a forward pass: more than one chunk
    prompts, sampled = [[3, 4], [5], [6, 7, 8]], [[9, 1], [2, 3, 4], [5]]
    ids, mask = A.pad_batch(prompts, sampled)
    ref_token_logps = A.token_logprobs(ref, ids, mask, 3, 0.7)
    own = [ref_token_logps[i, : len(r)].tolist() for i, r in enumerate(sampled)]
    evals = [
        A.Evaluation(0, [], prompts, [], sampled_ids=sampled, sampled_logprobs=own),
        A.Evaluation(1, [], prompts, [], sampled_ids=sampled, sampled_logprobs=[[x + 0.1 for x in r] for r in own]),
        A.Evaluation(2, [], prompts, sampled),  # an older version's: greedy completions only
    ]
    kls = A.measure_kl(args, ref, evals, torch.device("cpu"))
    assert abs(kls[0]) < 1e-5
    assert kls[1] == pytest.approx(0.1 * (2 + 3 + 1) / 3, abs=1e-5)
    assert math.isnan(kls[2])


def test_evaluations_are_denser_near_the_end_only_when_asked():
    """The study's final gold reward is a mean over the last evaluations: --eval_every_at_end 4 adds every 4th
    version over the last --eval_every; without it (the default run) the versions are as they always were."""

    def versions(**flags):
        args = A.Args(**({"num_steps": 64, "eval_every": 16} | flags))
        return [v for v in range(args.num_steps + 1) if A.evaluated(args, v)]

    assert versions() == [0, 16, 32, 48, 64]
    assert versions(eval_every_at_end=4) == [0, 16, 32, 48, 52, 56, 60, 64]
    # A run that is no whole number of --eval_every keeps its every-16th versions, the last, and every 3rd near the end.
    assert versions(num_steps=70, eval_every_at_end=3)[3:] == [48, 57, 60, 63, 64, 66, 69, 70]
