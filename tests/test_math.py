"""The pure math of async_online_dpo.py against independent reference computations."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import async_online_dpo as A


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=11,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def test_token_logprobs_match_a_token_by_token_reference():
    model = tiny_model()
    prompts, responses = [[3, 4, 5], [6, 7]], [[8, 9, 1], [2, 3, 4, 5]]
    ids, mask = A.pad_batch(prompts, responses)
    temperature = 0.7
    got = A.token_logprobs(model, ids, mask, 4, temperature)  # (B, R)
    assert got.shape == (2, 4)

    # Reference: score each response token separately, from the unpadded prefix alone, in float64.
    for i, (p, r) in enumerate(zip(prompts, responses)):
        for t in range(len(r)):
            prefix = torch.tensor([p + r[:t]])
            logits = model(input_ids=prefix).logits[0, -1].double() / temperature
            expected = (logits[r[t]] - torch.logsumexp(logits, 0)).item()
            assert abs(got[i, t].item() - expected) < 1e-4, (i, t, got[i, t].item(), expected)


def test_token_logprobs_ignore_padding():
    model = tiny_model()
    alone = A.token_logprobs(model, *A.pad_batch([[3, 4]], [[5, 6]]), 2, 1.0)
    padded = A.token_logprobs(model, *A.pad_batch([[3, 4], [1, 2, 3, 4, 5]], [[5, 6], [7, 8, 9]]), 3, 1.0)
    assert torch.allclose(padded[0, :2], alone[0], atol=1e-5)  # same prompt and response, padded on both sides


def test_token_logprobs_compute_logits_for_response_positions_only():
    """At a 128k vocabulary the logits of the prompt positions alone take gigabytes: the head must not see them."""
    model = tiny_model()
    ids, mask = A.pad_batch([[3, 4, 5, 6, 7, 8, 9]], [[1, 2]])
    seen = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[1]))
    A.token_logprobs(model, ids, mask, 2, 1.0)
    assert seen == [3]  # the logits before each of the 2 response tokens, and one after the last


def test_dpo_loss_matches_the_formula():
    c, r, rc, rr = (
        torch.tensor([-3.0, -10.0]),
        torch.tensor([-5.0, -2.0]),
        torch.tensor([-4.0, -9.0]),
        torch.tensor([-4.5, -3.0]),
    )
    beta = 0.1
    got = A.dpo_loss(c, r, rc, rr, beta, "sigmoid")
    for i in range(2):
        h = beta * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        assert abs(got[i].item() - math.log(1 + math.exp(-h))) < 1e-6
    got_ipo = A.dpo_loss(c, r, rc, rr, beta, "ipo")
    for i in range(2):
        h = ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        assert abs(got_ipo[i].item() - (h - 1 / (2 * beta)) ** 2) < 1e-4


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    c, r = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    A.dpo_loss(c, r, torch.tensor([-3.0]), torch.tensor([-3.0]), 0.1).sum().backward()
    assert c.grad.item() < 0 < r.grad.item()  # descending the loss raises log π(y_c) and lowers log π(y_r)


def test_select_pairs_best_and_worst_of_k_and_ties():
    scores = torch.tensor([[0.2, 0.9, 0.1, 0.5], [0.3, 0.3, 0.3, 0.3], [0.0, -1.0, 1.0, 1.0]])
    chosen, rejected, valid = A.select_pairs(scores)  # indices into the 3 x 4 completions
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2
    assert valid.tolist() == [True, False, True]
    assert scores.flatten()[chosen[2]] == 1.0 and rejected[2] == 2 * 4 + 1


def test_missing_eos_penalty_replaces_the_score():
    rewards, has_eos = torch.tensor([0.8, 0.3, 1.0]), torch.tensor([True, False, False])
    assert torch.allclose(A.apply_missing_eos_penalty(rewards, has_eos, -1.0), torch.tensor([0.8, -1.0, -1.0]))


def test_missing_eos_penalty_can_be_turned_off():
    rewards, has_eos = torch.tensor([0.8, 0.3]), torch.tensor([True, False])
    assert torch.equal(A.apply_missing_eos_penalty(rewards, has_eos, None), rewards)


def test_builtin_reward_gives_partial_credit():
    prompts = ["dbca=", "dbca=", "dbca=", "dbca=", "dbca="]
    completions = ["abcd", "abdc", "abcdzz", "", "bcd"]
    assert A.builtin_reward(prompts, completions) == pytest.approx([1.0, 0.5, 4 / 6, 0.0, 0.75])
    assert all(0 <= x <= 1 for x in A.builtin_reward(["zzz=", "ab="], ["zz", "abc"]))


def test_edit_distance_against_brute_force():
    import random

    def reference(a, b):  # recursive definition, memoised
        from functools import lru_cache

        @lru_cache(None)
        def d(i, j):
            if i == 0 or j == 0:
                return i + j
            return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

        return d(len(a), len(b))

    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choices("abc", k=rng.randint(0, 7)))
        b = "".join(rng.choices("abc", k=rng.randint(0, 7)))
        assert A.edit_distance(a, b) == reference(a, b), (a, b)
    assert A.edit_distance("kitten", "sitting") == 3


def test_pad_batch_pads_prompts_left_and_responses_right():
    ids, mask = A.pad_batch([[5, 6], [7]], [[8], [9, 10, 11]])
    assert ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert A.position_ids(mask).tolist() == [[0, 1, 2, 2, 2], [0, 0, 1, 2, 3]]


# ----------------------------------------------------------------------------------------------------
# The paper's other losses, against its code's form (mnoukhov/async_rlhf, src/rloo_trainer.py and
# src/online_bok_trainer.py), written out here for one batch.
def test_rloo_matches_the_papers_computation():
    """The paper's RLOO: its code lays the k samples out as k blocks of P prompts (queries.repeat(k, 1)); we lay out
    the k samples of a prompt side by side. Same numbers either way."""
    P, k, kl_coef, clip = 3, 3, 0.05, 0.2
    torch.manual_seed(0)
    scores = torch.randn(P, k)  # one score per completion, the penalty already applied
    old_logps, ref_logps = -torch.rand(P, k) * 10, -torch.rand(P, k) * 10  # Σ_t log π_old, Σ_t log π_ref
    new_logps = old_logps + torch.tensor([[0.5, -0.5, 0.0], [0.1, -0.1, 0.3], [-0.3, 0.2, 0.0]])  # some clip, some not

    # The paper's code, transcribed, in its (k, P) layout.
    kl = (old_logps - ref_logps).T.flatten()
    rlhf_reward = (scores.T.flatten() - kl_coef * kl).reshape(k, -1)
    baseline = (rlhf_reward.sum(0) - rlhf_reward) / (k - 1)
    advantages = (rlhf_reward - baseline).flatten()
    ratio = torch.exp(new_logps.T.flatten() - old_logps.T.flatten())
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    expected = torch.max(pg_losses, pg_losses2).reshape(k, P).T  # back to (P, k)

    ours_advantages = A.rloo_advantages(scores - kl_coef * (old_logps - ref_logps))
    losses, ours_ratio, clipped = A.rloo_loss(new_logps, old_logps, ours_advantages, clip)
    assert torch.allclose(ours_advantages.T.flatten(), advantages, atol=1e-6)
    assert torch.allclose(losses, expected, atol=1e-6)
    assert torch.allclose(ours_ratio.T.flatten(), ratio, atol=1e-6)
    assert torch.equal(clipped.T.flatten(), pg_losses2 > pg_losses)
    assert 0 < clipped.sum() < clipped.numel()  # the example exercises both branches
    # A baseline that leaves a completion out: the advantages of a prompt sum to 0.
    assert torch.allclose(ours_advantages.sum(1), torch.zeros(P), atol=1e-5)


def test_rloo_gradient_flows_only_where_the_ratio_is_not_clipped():
    old = torch.zeros(4)
    new = torch.tensor([0.5, 0.5, -0.5, 0.0], requires_grad=True)  # ρ = e^0.5 > 1.2, e^0.5, e^-0.5 < 0.8, 1
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    losses, _, clipped = A.rloo_loss(new, old, advantages, 0.2)
    losses.sum().backward()
    # A > 0 and ρ > 1 + ε: clipped, no push further. A < 0 and ρ > 1: not clipped (pessimistic bound). A < 0 and
    # ρ < 1 - ε: clipped. Inside the range: -A ρ, gradient -A ρ.
    assert clipped.tolist() == [True, False, True, False]
    assert new.grad[0] == 0 and new.grad[2] == 0
    assert new.grad[1].item() == pytest.approx(math.exp(0.5)) and new.grad[3].item() == pytest.approx(-1.0)


def test_best_of_k_loss_is_the_negative_log_likelihood_of_the_chosen():
    model = tiny_model()
    prompts, responses = [[3, 4], [5]], [[6, 7, 1], [8, 1]]
    ids, mask = A.pad_batch(prompts, responses)
    token_logps = A.token_logprobs(model, ids, mask, 3, 1.0)
    logps = (token_logps * mask[:, -3:]).sum(1)
    expected = []
    for p, r in zip(prompts, responses):  # -log p(y|x), token by token
        total = 0.0
        for t in range(len(r)):
            logits = model(input_ids=torch.tensor([p + r[:t]])).logits[0, -1].double()
            total += (logits[r[t]] - torch.logsumexp(logits, 0)).item()
        expected.append(-total)
    assert A.best_of_k_loss(logps).tolist() == pytest.approx(expected, abs=1e-4)


def test_the_off_policy_correction_is_the_truncated_pair_ratio_by_hand():
    """tis_ratio against the formula written out: w = min(C, exp(Σ log π_θ(chosen, rejected) - Σ log μ(the same))),
    per pair, from token log-probs as vLLM sends them (lists of floats), detached."""
    trainer = {"chosen": [[-0.5, -1.0, -0.25], [-2.0, -0.1]], "rejected": [[-1.5, -0.75], [-0.2, -0.3, -0.4]]}
    sampler = {"chosen": [[-0.6, -1.2, -0.3], [-3.0, -0.1]], "rejected": [[-1.0, -0.5], [-0.2, -0.3, -0.4]]}
    pair_logps = torch.tensor([sum(trainer["chosen"][i]) + sum(trainer["rejected"][i]) for i in range(2)])
    pair_logps.requires_grad_(True)
    sampler_logps = torch.tensor([sum(sampler["chosen"][i]) + sum(sampler["rejected"][i]) for i in range(2)])
    cap = 1.5
    by_hand = []
    for i in range(2):
        log_ratio = sum(trainer["chosen"][i]) - sum(sampler["chosen"][i])
        log_ratio += sum(trainer["rejected"][i]) - sum(sampler["rejected"][i])
        by_hand.append(min(cap, math.exp(log_ratio)))
    got = A.tis_ratio(pair_logps, sampler_logps, cap)
    assert got.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand[0] == pytest.approx(math.exp(0.35 - 0.75)) and by_hand[0] < cap  # not capped
    assert by_hand[1] == cap  # exp(1.0) = 2.72, capped
    assert not got.requires_grad  # a weight on the loss: no gradient flows through it


def test_the_off_policy_correction_is_1_at_lag_0_and_when_off():
    """Where the trainer holds the weights that sampled (lag 0), π_θ = μ and every pair weighs 1; off (cap None), every
    pair weighs exactly 1 whatever the log-probs, so the loss is the one without the correction, to the bit."""
    logps = torch.tensor([-3.25, -10.5, -0.125])
    assert A.tis_ratio(logps, logps.clone(), 2.0).tolist() == [1.0, 1.0, 1.0]
    assert A.tis_ratio(logps, logps - 5.0, None).tolist() == [1.0, 1.0, 1.0]
    losses = A.dpo_loss(logps, logps - 1, logps + 0.5, logps - 2, 0.1)
    assert torch.equal(losses * A.tis_ratio(logps, logps + 3, None), losses)


def test_each_loss_trains_on_its_own_completions():
    """What train() picks from select_pairs: DPO and IPO the (chosen, rejected) pair of each prompt whose scores differ,
    best-of-k the chosen of every prompt. RLOO trains on every completion."""
    scores = torch.tensor([[0.2, 0.9], [0.5, 0.5], [1.0, 0.0]])  # prompt 1 ties
    chosen, rejected, valid = A.select_pairs(scores)
    assert list(zip(chosen[valid].tolist(), rejected[valid].tolist())) == [(1, 0), (4, 5)]  # the tie left out
    assert chosen.tolist() == [1, 2, 4]  # best-of-k: the best, tie or not (the first of a tie)
    chosen, rejected, valid = A.select_pairs(torch.tensor([[0.1, 0.7, 0.3, 0.0]]))
    assert list(zip(chosen[valid].tolist(), rejected[valid].tolist())) == [(1, 3)]  # best and worst of k = 4


# ----------------------------------------------------------------------------------------------------
# The staleness rule.
@pytest.mark.parametrize("N", [1, 2, 4])
def test_the_papers_n_gives_lags_0_to_n_minus_1_in_every_round(N):
    args = A.Args(batches_per_round=N, async_steps=0, num_steps=16)
    lags = [i - A.sampling_version(args, i) for i in range(16)]
    assert lags == [i % N for i in range(16)]  # N = 1: on-policy


FIRST_16_VERSIONS = {  # written out by hand from the rule's definition: a round of N batches, A rounds ahead
    (1, 1): [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    (1, 3): [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    (2, 1): [0, 0, 0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12],
    (4, 2): [0] * 12 + [4] * 4,
}


@pytest.mark.parametrize("N, ahead", [(1, 1), (1, 3), (2, 1), (4, 2)])
def test_running_rounds_ahead_adds_n_updates_of_lag_per_round(N, ahead):
    args = A.Args(batches_per_round=N, async_steps=ahead, num_steps=32)
    versions = [A.sampling_version(args, i) for i in range(32)]
    assert versions[:16] == FIRST_16_VERSIONS[(N, ahead)]
    assert all(v % N == 0 for v in versions)  # a round starts at a version the trainer pushes
    lags = [i - v for i, v in enumerate(versions)]
    assert lags[N * ahead :] == [N * ahead + i % N for i in range(N * ahead, 32)]
    if N == 1:  # --async_steps A alone: every batch exactly A updates old, once there are A of them
        assert versions == [max(0, i - ahead) for i in range(32)]
