"""The weight sync is real: after a push, vLLM in the generator process samples from the pushed weights."""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

import async_online_dpo as A
from conftest import read_run, run_script, wrapper_script


def transformers_greedy(model, tokenizer, prompts, max_new_tokens):
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


@contextmanager
def generator_process(args, model_path):
    """The real generator in a spawned process, with its real queues; stopped and reaped afterwards."""
    queues = A.new_queues()
    prompts, _ = A.load_prompts(args)
    settings = ([0], args, queues, model_path, 0, 0, prompts, 32)  # cores, ..., version 0, from batch 0, context 32
    process = mp.get_context("spawn").Process(target=A.generator_process, args=settings)
    try:
        yield process, queues.weights, queues.samples
    finally:
        queues.stop.set()
        if process.is_alive():
            process.join(timeout=10)
            process.kill()


def snapshot(policy, version):
    """What the trainer pushes: the packed weights, and the probe the generator checks them with after loading."""
    tokenizer = AutoTokenizer.from_pretrained(policy.name_or_path)
    prompt_ids, response_ids = A.tokenize(tokenizer, ["dcba="])[0], A.tokenize(tokenizer, ["abcd"])[0]
    with torch.no_grad():
        logprobs = A.token_logprobs(policy, *A.pad_batch([prompt_ids], [response_ids]), len(response_ids), 1.0)[0]
    probe = A.Probe(prompt_ids, response_ids, logprobs.tolist())
    return A.Snapshot(version, A.pack_weights(policy, torch.float32, "cpu", is_rank_0=True), probe)


def test_generator_serves_the_latest_pushed_weights(cache_dir, model_path):
    args = A.Args(
        cache_dir=cache_dir, num_steps=2, batch_size=4, eval_prompts=24, eval_every=1, async_steps=0, response_length=16
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    policy = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with generator_process(args, model_path) as (process, weights_queue, samples_queue):
        process.start()

        def push(version):
            weights_queue.put(snapshot(policy, version))

        assert A.receive(samples_queue, process) == A.Ready()  # vLLM is up: the first message says so
        # Version 0, loaded from disk: the generator's greedy output is transformers' from the same weights. Each
        # evaluation comes as it is made, before the batch sampled next.
        eval0 = A.receive(samples_queue, process)
        batch = A.receive(samples_queue, process)
        assert isinstance(eval0, A.Evaluation) and isinstance(batch, A.Batch)
        assert batch.version == 0 and eval0.version == 0
        old = transformers_greedy(policy, tokenizer, eval0.prompts, args.response_length)
        assert eval0.response_ids == old

        # The trainer changes its weights (a few optimizer steps towards reversed answers) and pushes them.
        optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
        for _ in range(5):
            prompts = eval0.prompts
            seqs = [
                tokenizer(p)["input_ids"] + tokenizer(p[:-1][::-1])["input_ids"] + [tokenizer.eos_token_id]
                for p in prompts
            ]
            ids, mask = A.pad_batch(seqs, [[]] * len(seqs))
            policy(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        policy.eval()
        push(1)
        eval1 = A.receive(samples_queue, process)
        batch = A.receive(samples_queue, process)
        assert batch.version == 1 and eval1.version == 1
        ((version, gap),) = batch.checks  # the generator checked the load against the probe
        assert version == 1 and gap < 1e-4
        new = transformers_greedy(policy, tokenizer, eval1.prompts, args.response_length)
        assert eval1.response_ids == new  # vLLM now serves the new weights...
        assert sum(a != b for a, b in zip(new, old)) >= len(old) // 2  # ...which really changed the output

        push(2)  # the generator evaluates the final version, then exits
        assert A.receive(samples_queue, process).version == 2
        assert isinstance(A.receive(samples_queue, process), A.Done)
        process.join(timeout=30)
        assert process.exitcode == 0


def perturbed(policy, seed: int):
    """A copy of the policy with every weight moved a little, differently for each seed: another policy version."""
    other = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in other.parameters():
            w.add_(0.02 * torch.randn(w.shape, generator=generator))
    return other


def serving_versions(message, policies: dict, k: int, temperature: float) -> list[int]:
    """The versions whose weights give vLLM's log-probs of the message's sampled tokens, within float error."""
    if isinstance(message, A.Batch):
        prompts, completions, logprobs = message.prompt_ids, message.response_ids, message.logprobs
    else:  # an evaluation: one sampled completion per prompt
        prompts, completions, logprobs, k = message.prompt_ids, message.sampled_ids, message.sampled_logprobs, 1
    found = []
    for version, policy in policies.items():
        gap = 0.0
        for j, (completion, vllm_logps) in enumerate(zip(completions, logprobs)):
            ids, mask = A.pad_batch([prompts[j // k]], [completion])
            with torch.no_grad():
                ours = A.token_logprobs(policy, ids, mask, len(completion), temperature)[0]
            gap = max(gap, (ours - torch.tensor(vllm_logps)).abs().max().item())
        if gap < 1e-3:
            found.append(version)
    return found


@pytest.mark.parametrize(
    "rounds, ahead, messages, loaded",
    [
        (1, 2, ["eval 0", "batch 0", "batch 0", "batch 0", "batch 1", "eval 2", "eval 4", "done"], [1, 2, 4]),
        (2, 0, ["eval 0", "batch 0", "batch 0", "eval 2", "batch 2", "batch 2", "eval 4", "done"], [2, 4]),
    ],
    ids=["A=2", "N=2"],
)
def test_generator_samples_batch_i_with_the_version_the_rule_gives_and_evaluates_every_due_version(
    cache_dir, model_path, rounds, ahead, messages, loaded
):
    """Four snapshots, each of different weights, wait on the queue before vLLM has even started. Batch i must still
    be sampled by exactly version max(0, N (i // N - A)): with A = 2, version max(0, i - 2); with the paper's N = 2,
    versions 0, 0, 2, 2. Versions 2 and 4 (--eval_every 2) are evaluated on the way; the others are skipped. Each
    message's log-probs show which weights vLLM served: those of the version it is labelled with, and no other."""
    args = A.Args(cache_dir=cache_dir, num_steps=4, batch_size=4, eval_prompts=8, eval_every=2, response_length=16)
    args.batches_per_round, args.async_steps = rounds, ahead
    policies = {0: AutoModelForCausalLM.from_pretrained(model_path).eval()}
    policies |= {version: perturbed(policies[0], seed=version) for version in range(1, 5)}
    with generator_process(args, model_path) as (process, weights_queue, samples_queue):
        for version in range(1, 5):
            weights_queue.put(snapshot(policies[version], version))
        process.start()
        assert A.receive(samples_queue, process) == A.Ready()
        received = [A.receive(samples_queue, process)]
        while not isinstance(received[-1], A.Done):  # the generator ends by reading up to version num_steps
            received.append(A.receive(samples_queue, process))

        def label(m):
            kind = {A.Evaluation: "eval", A.Batch: "batch", A.Done: "done"}[type(m)]
            return kind if kind == "done" else f"{kind} {m.version}"

        assert [label(m) for m in received] == messages
        # It loads only the versions it samples with or evaluates, and checks each against its probe.
        assert [version for m in received for version, _ in getattr(m, "checks", [])] == loaded
        for m in received[:-1]:
            assert serving_versions(m, policies, args.num_samples, args.temperature) == [m.version], label(m)
        process.join(timeout=30)
        assert process.exitcode == 0


def run_wrapped(cache_dir, tmp_path, prelude, *flags):
    return run_script(wrapper_script(tmp_path, prelude), cache_dir, tmp_path / "out", *flags)


# ----------------------------------------------------------------------------------------------------
# The weight-sync check: a run whose weight sync is broken stops before it trains on a batch vLLM sampled with
# weights other than those pushed: a sync run at batch 1, an async one (N = 1) at batch 2, the first from version 1.
@pytest.mark.parametrize("async_steps", [0, 1])
def test_a_broken_weight_sync_stops_the_run(cache_dir, tmp_path, async_steps):
    broken = "A.load_weights_into_vllm = lambda llm, weights: None  # vLLM keeps serving version 0"
    result = run_wrapped(cache_dir, tmp_path, broken, "--async_steps", str(async_steps))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[-1].startswith("error: the weight sync is broken: after loading policy version 1"), errors
    _, steps, _ = read_run(tmp_path / "out")
    assert [s["step"] for s in steps] == list(range(1 + async_steps))  # batches sampled by version 0 only
    assert steps[0]["async/logprob_gap"] < 1e-4  # version 0, loaded by vLLM from disk, agreed


def test_a_trainer_that_holds_other_weights_than_vllm_stops_at_the_first_lag_0_batch(cache_dir, tmp_path):
    """The lag-0 check compares vLLM's log-probs of the sampled tokens with the trainer's: here the trainer's
    policy is not the one vLLM loaded, so batch 0 already disagrees."""
    other = """
load_policy = A.load_policy
def other_policy(*args, **kwargs):
    policy = load_policy(*args, **kwargs)
    with torch.no_grad():
        policy.lm_head.weight.mul_(1.5)
    return policy
A.load_policy = other_policy
"""
    result = run_wrapped(cache_dir, tmp_path, other, "--async_steps", "1")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[-1].startswith(
        "error: the weight sync is broken: batch 0 was sampled by policy version 0"
    ), errors
    assert read_run(tmp_path / "out")[1] == []  # nothing trained


def test_a_broken_weight_sync_on_a_gpu_names_vllms_async_scheduling_first():
    """vLLM schedules ahead on GPUs by default, and no CPU runs that path: the one sentence names its flag there."""
    on_gpu = str(A.WeightSyncError(0.5, 1e-3, 3, probe=True, async_scheduling=True))
    on_cpu = str(A.WeightSyncError(0.5, 1e-3, 3, probe=True))
    assert on_gpu.endswith("vLLM is not serving the pushed weights; try --no_vllm_async_scheduling first.")
    assert "async" not in on_cpu and on_cpu.endswith("vLLM is not serving the pushed weights.")
