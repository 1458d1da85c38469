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
    chosen, rejected, valid = A.select_pairs(scores)
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2
    assert valid.tolist() == [True, False, True]
    assert scores[2, chosen[2]] == 1.0 and rejected[2] == 1


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
