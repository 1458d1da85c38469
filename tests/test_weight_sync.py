"""The weight sync is real: after a push, vLLM in the generator process samples from the pushed weights."""

from contextlib import contextmanager

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

import async_online_dpo as A


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
    ctx = mp.get_context("spawn")
    weights_queue, samples_queue, snapshot_free, stop = ctx.Queue(), ctx.Queue(), ctx.Semaphore(1), ctx.Event()
    settings = dict(args=args, model_path=model_path, start_version=0, first_batch=0, max_model_len=32, cpu_cores=[0])
    queues = dict(weights_queue=weights_queue, snapshot_free=snapshot_free, samples_queue=samples_queue, stop=stop)
    process = ctx.Process(target=A.generator_process, kwargs=settings | queues)
    try:
        yield process, weights_queue, samples_queue
    finally:
        stop.set()
        if process.is_alive():
            process.join(timeout=10)
            process.kill()


def snapshot(policy, version):
    """What the trainer pushes: the packed weights, and the probe the generator checks them with after loading."""
    tokenizer = AutoTokenizer.from_pretrained(policy.name_or_path)
    prompt_ids, response_ids = A.tokenize(tokenizer, ["dcba="])[0], A.tokenize(tokenizer, ["abcd"])[0]
    with torch.no_grad():
        logprobs = A.token_logprobs(policy, *A.pad_batch([prompt_ids], [response_ids]), len(response_ids), 1.0)[0]
    probe = {"prompt_ids": prompt_ids, "response_ids": response_ids, "logprobs": logprobs.tolist()}
    return {"version": version, "snapshot": A.pack_weights(policy, torch.float32, "cpu", rank=0), "probe": probe}


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

        assert A.receive(samples_queue, process) == {"ready": True}  # vLLM is up: the first message says so
        # Version 0, loaded from disk: the generator's greedy output is transformers' from the same weights. Each
        # evaluation comes as it is made, before the batch sampled next.
        (eval0,) = A.receive(samples_queue, process)["evals"]
        batch = A.receive(samples_queue, process)
        assert batch["version"] == 0 and eval0["version"] == 0
        old = transformers_greedy(policy, tokenizer, eval0["prompts"], args.response_length)
        assert eval0["response_ids"] == old

        # The trainer changes its weights (a few optimizer steps towards reversed answers) and pushes them.
        optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
        for _ in range(5):
            prompts = eval0["prompts"]
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
        (eval1,) = A.receive(samples_queue, process)["evals"]
        batch = A.receive(samples_queue, process)
        assert batch["version"] == 1 and eval1["version"] == 1
        ((version, gap),) = batch["checks"]  # the generator checked the load against the probe
        assert version == 1 and gap < 1e-4
        new = transformers_greedy(policy, tokenizer, eval1["prompts"], args.response_length)
        assert eval1["response_ids"] == new  # vLLM now serves the new weights...
        assert sum(a != b for a, b in zip(new, old)) >= len(old) // 2  # ...which really changed the output

        push(2)  # the generator evaluates the final version, then exits
        assert [e["version"] for e in A.receive(samples_queue, process)["evals"]] == [2]
        assert A.receive(samples_queue, process)["done"]
        process.join(timeout=30)
        assert process.exitcode == 0


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
    """Four snapshots wait on the queue before vLLM has even started. Batch i must still be sampled by exactly
    version max(0, N (i // N - A)): with A = 2, version max(0, i - 2); with the paper's N = 2, versions 0, 0, 2, 2.
    Versions 2 and 4 (--eval_every 2) are evaluated on the way; the others are skipped."""
    args = A.Args(cache_dir=cache_dir, num_steps=4, batch_size=4, eval_prompts=8, eval_every=2, response_length=16)
    args.batches_per_round, args.async_steps = rounds, ahead
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    with generator_process(args, model_path) as (process, weights_queue, samples_queue):
        for version in range(1, 5):
            weights_queue.put(snapshot(policy, version))
        process.start()
        assert A.receive(samples_queue, process) == {"ready": True}
        received = [A.receive(samples_queue, process)]
        while "done" not in received[-1]:  # the generator ends by reading up to version num_steps
            received.append(A.receive(samples_queue, process))

        def label(m):
            return (
                f"eval {m['evals'][0]['version']}"
                if "evals" in m
                else f"batch {m['version']}"
                if "version" in m
                else "done"
            )

        assert [label(m) for m in received] == messages
        # It loads only the versions it samples with or evaluates, and checks each against its probe.
        assert [version for m in received for version, _ in m.get("checks", [])] == loaded
        process.join(timeout=30)
        assert process.exitcode == 0
