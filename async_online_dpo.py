"""Asynchronous online DPO with a vLLM generator in its own process.

Reference implementation of "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language Models"
(Noukhovitch et al., ICLR 2025, arXiv 2410.18252). A vLLM generator samples completions with an older policy
while the trainer learns from earlier batches (online DPO), so they overlap; `sync_baseline.py` is the same in lockstep.

    python async_online_dpo.py     # CPU: generator and trainer on separate cores; 1 GPU: both share GPU 0
    CUDA_VISIBLE_DEVICES=0,1 python async_online_dpo.py   # 2 GPUs: generator on GPU 0, trainer on GPU 1
    torchrun --nproc_per_node 4 async_online_dpo.py --fsdp --bf16   # 5 GPUs: generator, 4 FSDP2 trainer ranks
    python async_online_dpo.py --async_steps 4      # let the generator run 4 batches ahead
    python sync_baseline.py --batches_per_round 4   # the paper's off-policy N: one version samples 4 batches
    python async_online_dpo.py --loss_type rloo     # or ipo, best_of_k; --updates_per_batch 2, --model_size 30m

Part I, the method, reads top to bottom in the order things happen; Part II, below a divider, is support code.
README.md is the tutorial; docs/ is the reference: metrics, implementation details, GPUs, benchmark, study.
"""

import datetime
import gc
import glob
import importlib
import json
import logging
import math
import multiprocessing.util
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import tyro
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers import GenerationConfig


@dataclass
class Args:
    # --- experiment
    exp_name: str = "async_online_dpo"
    """name of this experiment; the run folder is `{output_dir}/{exp_name}__{seed}__{unix time}`"""
    seed: int = 1
    """seed for prompts, sampling and initialisation"""
    output_dir: str = "runs"
    """folder that receives one subfolder per run (args, metrics, TensorBoard events, samples, model)"""
    cache_dir: str = ".cache"
    """folder for the warm-started built-in model and vLLM's compile cache, reused across runs"""
    track: bool = False
    """also log to Weights & Biases (imported only when set; the project comes from $WANDB_PROJECT)"""

    # --- model, data and reward
    model_name_or_path: str = ""
    """transformers causal LM (folder or hub name): the policy and the frozen reference; empty = built-in"""
    model_size: Literal["3m", "10m", "30m"] = "10m"
    """parameters of the built-in policy, used when --model_name_or_path is empty (each size is warm-started once)"""
    dataset: str = ""
    """hub dataset name or local .json/.jsonl file of prompts; empty = the built-in letter-sorting task"""
    dataset_split: str = "train"
    """split of --dataset to train on (a local file has one split, "train")"""
    prompt_column: str = "prompt"
    """column with the prompt text, formatted as the policy expects it (chat template applied)"""
    reference_column: str = ""
    """column with a reference completion; when set, evaluation reports the win-rate against it"""
    reward_fn: str = ""
    """`module:function` scoring (prompts, completions), lists of str, one float each; empty = built-in"""
    reward_model_path: str = ""
    """sequence-classification reward model for training (overrides --reward_fn); any tokenizer"""
    gold_reward_model_path: str = ""
    """reward model for evaluation only (the paper's gold model); empty = the training reward"""
    sft_steps: int = 30
    """supervised warm-start steps for the built-in model (cached under --cache_dir)"""

    # --- the loss
    num_steps: int = 128
    """batches to train on, each of --batch_size prompts; policy version v is the policy after v batches"""
    batch_size: int = 64
    """prompts per batch, across all trainer ranks (the paper uses 512 on TL;DR)"""
    num_samples: int = 2
    """k, completions sampled per prompt"""
    response_length: int = 16
    """most tokens sampled per completion (the paper uses 53 on TL;DR)"""
    temperature: float = 0.7
    """sampling temperature; policy and reference logits are divided by it too, as in the paper's code"""
    missing_eos_penalty: float | None = -1.0
    """score that *replaces* the reward of a completion cut off before EOS (the paper: -1); None: off. See docs/"""
    loss_type: Literal["sigmoid", "ipo", "rloo", "best_of_k"] = "sigmoid"
    """sigmoid: online DPO on the best and worst of k; ipo: IPO on them; rloo: RLOO on all k; best_of_k: SFT on best"""
    beta: float = 0.1
    """β in the DPO and IPO losses, the strength of the pull towards the reference"""
    kl_coef: float = 0.05
    """RLOO: the KL penalty in its reward, score - kl_coef · Σ_t (log π_old - log π_ref) (the paper: 0.05)"""
    clip_range: float = 0.2
    """RLOO: ε, the sequence ratio π_θ / π_old is clipped to [1 - ε, 1 + ε] (the paper: 0.2)"""
    tis_cap: float | None = None
    """online DPO's off-policy correction: weigh each pair by π_θ / π_sampler, truncated at this cap; None: off"""
    learning_rate: float = 1e-4
    """AdamW learning rate, decayed linearly to 0 over all --num_steps × --updates_per_batch updates"""
    updates_per_batch: int = 1
    """E, optimizer updates on each batch (the paper's "ppo epochs"); the weights are pushed after the last one"""
    micro_batch_size: int = 32
    """loss terms per forward/backward on a rank (DPO: pairs; RLOO, best-of-k: completions); gradients accumulate"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # --- asynchrony
    batches_per_round: int = 1
    """N, the paper's off-policy N: one policy version samples N batches in a row (lags 0 .. N-1 when A = 0)"""
    async_steps: int = 1
    """A, rounds the generator runs ahead: batch i is sampled by version max(0, N·(i // N - A)); 0 = synchronous"""
    logprob_gap_tolerance: float | None = None
    """stop where vLLM's and the trainer's log-probs should agree but differ per token by more (None: 1e-3; bf16 0.1)"""

    # --- evaluation
    eval_every: int = 16
    """evaluate the policy versions that are multiples of this, and the first and last"""
    eval_every_at_end: int = 0
    """over the last --eval_every versions, also evaluate every this many (0: no): a steadier final number"""
    eval_prompts: int = 256
    """held-out prompts per evaluation (greedy): the first of --eval_split, else the last of --dataset_split"""
    eval_split: str = ""
    """split of --dataset to evaluate on ("validation" on TL;DR, as in the paper); empty = hold out rows instead"""
    eval_response_length: int | None = None
    """most tokens per evaluation completion (the paper: 128 on TL;DR, where training samples 53); None = as training"""

    # --- checkpoints
    save_every: int = 0
    """save a checkpoint every this many policy versions, i.e. batches (0 = never); only the newest is kept"""
    resume: str = ""
    """run folder to continue from its newest checkpoint, with the flags it was started with"""

    # --- hardware
    trainer_ranks: int = 1
    """R, data-parallel trainer ranks to start here, on GPUs 1..R (GPU 0 is the generator's) or cores; or torchrun's"""
    fsdp: bool = False
    """shard weights, gradients and Adam state over the ranks with FSDP2 (when they don't fit one GPU)"""
    bf16: bool = False
    """train under bfloat16 autocast (weights and Adam state stay float32) and run vLLM in bfloat16"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    vllm_gpu_memory_utilization: float | None = None
    """share of GPU 0's memory vLLM reserves; None: 0.4 when the trainer shares GPU 0, else 0.9 less the snapshot's"""
    vllm_async_scheduling: bool = True
    """let vLLM schedule its next step while the GPU runs this one (its default on GPUs; a CPU never does)"""
    vllm_cpu_kv_cache_gib: int = 1
    """GiB of RAM vLLM reserves for its KV cache on a CPU (vLLM's own default takes most of the RAM)"""
    dist_timeout: int = 3600
    """seconds a rank waits for the others in a collective before the run fails (rank 0 may take long: docs/gpus.md)"""
    cpu_share_cores: bool = False
    """on a CPU, give generator and trainer every core, not half each: for sync runs, where they take turns"""


# ----------------------------------------------------------------------------------------------------
# The math: log-probs, scores, pairs and the losses. Pure functions, checked in tests/.
def token_logprobs(model, input_ids, attention_mask, response_width: int, temperature: float):
    """log π(y_t | x, y_<t), (B, T), of the last T = `response_width` tokens of each row, logits divided by the sampling
    temperature as in the paper's code. A row is a left-padded prompt, positions from 0 after the padding, then its
    right-padded response (pad_batch): every response starts in the same column, so only the last T + 1 need logits (all
    would take GBs at a 128k vocabulary), and their float32 log-softmax runs a row at a time, recomputed in backward."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_width + 1,
        use_cache=False,
    ).logits[:, :-1]  # (B, T, V): the logits at column t predict the token at t + 1
    targets = input_ids[:, -response_width:]  # (B, T)
    rows = [checkpoint(row_logprobs, x, y, temperature, use_reentrant=False) for x, y in zip(logits, targets)]
    return torch.stack(rows)  # (B, T)


def row_logprobs(logits, targets, temperature: float):
    """(T, V) logits and (T,) tokens -> (T,) log-probs of those tokens."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


def completion_logprobs(model, prompt_ids, response_ids, rows, args: Args, device):
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) of the completions `rows`, (B,), with token log-probs (B, T) and mask."""
    ids, mask = to_device(device, *pad_batch([prompt_ids[j] for j in rows], [response_ids[j] for j in rows]))
    width = max(len(response_ids[j]) for j in rows)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        token_logps = token_logprobs(model, ids, mask, width, args.temperature)  # (B, T)
    response_mask = mask[:, -width:]
    return (token_logps * response_mask).sum(1), token_logps, response_mask


def ended(response_ids: list[list[int]], eos_ids: set[int]) -> list[bool]:
    """Whether each completion stopped at EOS; the others were cut off at the length limit."""
    return [len(r) > 0 and r[-1] in eos_ids for r in response_ids]


def apply_missing_eos_penalty(rewards, has_eos, penalty: float | None):
    """A completion cut off before EOS gets the penalty as its score, as in the paper's code. None: no penalty."""
    return rewards if penalty is None else torch.where(has_eos, rewards, torch.full_like(rewards, penalty))


def select_pairs(scores):
    """Chosen = highest score, rejected = lowest, per prompt (the first of equal scores), as indices into the P·k
    completions scored by scores (P, k). valid: the scores differ, so the pair says which completion is better."""
    first = scores.shape[1] * torch.arange(len(scores))  # each prompt's first completion
    valid = scores.max(1).values > scores.min(1).values
    return first + scores.argmax(1), first + scores.argmin(1), valid  # (P,) each


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="sigmoid"):
    """Per-pair loss. DPO (Rafailov et al. 2023, eq. 7):
        -log σ(β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])
    IPO (Azar et al. 2023, eq. 17) regresses the same log-ratio difference to 1/(2β)."""
    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * logits)


def tis_ratio(pair_logps, sampler_pair_logps, cap: float | None):
    """The off-policy correction for online DPO (--tis_cap C; None: off, w = 1), a truncated importance ratio per pair:
        w = min(C, π_θ(y_c|x) π_θ(y_r|x) / (μ(y_c|x) μ(y_r|x))),   detached: it weighs the pair's loss
    μ (vLLM) sampled the pair; at lag 0, w = 1; with k = 2 the pair is all its prompt sampled, so uncapped w is its
    exact likelihood ratio. Truncated importance sampling (Yao et al. 2025, fengyao.notion.site/off-policy-rl; verl's
    sequence-level rollout IS caps at 2) on DPO's pairs. IcePop's band filter (arXiv 2510.18855) would leave too few."""
    if cap is None:
        return torch.ones_like(pair_logps)
    return torch.exp(pair_logps.detach() - sampler_pair_logps).clamp(max=cap)


def rloo_advantages(rewards):
    """RLOO (Ahmadian et al. 2024): each reward minus the mean reward of the prompt's other k - 1 completions."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)


def rloo_loss(logps, old_logps, advantages, clip_range: float):
    """Per-completion RLOO loss, PPO's clipped objective (Schulman et al. 2017, eq. 7) on the sequence ratio
    ρ = π_θ(y|x) / π_old(y|x) = exp(Σ_t log π_θ - Σ_t log π_old), where π_old sampled y:
        max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε))   also returned: ρ, and where the clipped term is larger (no gradient)"""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.max(unclipped, clipped), ratio, clipped > unclipped


def best_of_k_loss(chosen_logps):
    """Best-of-k SFT: -log π_θ(y_c|x) = -Σ_t log π_θ(y_t|x, y_<t) of the chosen completion; no reference, no KL."""
    return -chosen_logps


# ----------------------------------------------------------------------------------------------------
# The one place that touches vLLM internals, written against vLLM 0.32.0 (V1 engine on a CPU, runner V2 on GPUs).
def load_weights_into_vllm(llm, named_tensors: list):
    """reload_weights copies (transformers name, tensor) pairs into the engine's parameters in place: no restart, no
    disk, and CUDA graphs over them stay valid. The prefix cache holds the old weights' keys and values: dropped."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
    llm.reset_prefix_cache()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # every copy out of the trainer's buffer is done before we let go of it
        torch.cuda.empty_cache()  # the reload built each layer anew, outside vLLM's share (reload/layerwise.py)


# ----------------------------------------------------------------------------------------------------
# The generator process owns vLLM. Queues link it to rank 0 (torch.multiprocessing: tensors cross in shared memory).
@dataclass
class Queues:
    samples: Any  # generator -> trainer: Ready once vLLM is up, a Batch per step, each Evaluation once made, Done
    weights: Any  # trainer -> generator: a Snapshot of the policy after an update, with a Probe to check it by
    snapshot_free: Any  # the generator releases it when done with a snapshot: one at most is in memory
    stop: Any  # set by the trainer when it is done or has failed; the generator then stops


@dataclass
class Batch:
    version: int  # the policy version that sampled it
    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # the k completions of a prompt side by side
    logprobs: list[list[float]]  # vLLM's log-prob of each sampled token
    spans: list[tuple]  # (what, start, end) of the generator's work since the last batch, for the timeline
    checks: list[tuple[int, float]]  # (version, probe gap) of each snapshot loaded since: see the weight-sync check
    evals: list["Evaluation"] = field(default_factory=list)  # those that arrived before it, logged with it


@dataclass
class Evaluation:  # of policy `version`, on the held-out prompts
    version: int
    prompts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # greedy, for the gold reward
    sampled_ids: list[list[int]] | None = None  # one sample each as in training, for the KL; None in
    sampled_logprobs: list[list[float]] | None = None  # an evaluation an older version's checkpoint kept


@dataclass
class Snapshot:
    """The policy after an update: every weight, cast to vLLM's dtype, in one flat shared buffer (on a GPU, one CUDA
    IPC handle) with a (name, shape, offset) each (pack_weights); vLLM copies from views into it (unpack_weights)."""

    version: int
    packed: tuple  # (the buffer, [(name, shape, offset)])
    probe: "Probe"  # see make_probe


@dataclass
class Done:  # no more batches: what the generator did since the last one
    spans: list[tuple]
    checks: list[tuple[int, float]]
    evals: list[Evaluation] = field(default_factory=list)


# Sync, async and the paper's off-policy study differ in one rule: batch i is sampled by policy version
# max(0, N·(i // N - A)). One version samples a round of N = --batches_per_round batches, and the generator runs
# A = --async_steps rounds ahead. With N = A = 1 (the defaults) it samples batch i+1 as the trainer learns from b_i:
#
#   generator | b0 (v0)  | b1 (v0)  | b2 (v1)  | b3 (v2)  | ...      b_i (v_j): batch i sampled by version j
#   trainer   |   wait   | train b0 | train b1 | train b2 | ...      training b_i makes version i+1
#                                   ^ push v1  ^ push v2
#
# With A = 0 the generator waits for the version that starts each round. N = 1 is then synchronous, on-policy
# RLHF (sync_baseline.py); N = 4 is the paper's off-policy setting, each round trained at lags 0, 1, 2, 3:
#
#   generator | b0 (v0)  | b1 (v0)  | b2 (v0)  | b3 (v0)  |   wait   | b4 (v4)  | b5 (v4)  | ...
#   trainer   |   wait   | train b0 | train b1 | train b2 | train b3 |   wait   | train b4 | ...
#                                                                    ^ push v4
#
# The version is exact, not "at least": with per-prompt sampling seeds, a run is reproducible, resumed or not.
def sampling_version(args: Args, index: int) -> int:
    """The staleness rule: the policy version that samples batch `index`."""
    N = args.batches_per_round
    return max(0, N * (index // N - args.async_steps))


def evaluated(args: Args, version: int) -> bool:
    """The versions whose held-out gold reward and KL are measured (--eval_every, --eval_every_at_end: see Args)."""
    at_end = version > args.num_steps - args.eval_every and version % max(args.eval_every_at_end, 1) == 0
    return version % args.eval_every == 0 or version == args.num_steps or (args.eval_every_at_end > 0 and at_end)


def needed(args: Args, version: int) -> bool:
    """The push rule: only versions that sample a batch or are evaluated are pushed and loaded (sync: every one)."""
    samples = version % args.batches_per_round == 0 and version <= sampling_version(args, args.num_steps - 1)
    return samples or evaluated(args, version)


def generator(args: Args, queues: Queues, policy_path: str, version: int, first_batch: int, prompts, max_model_len):
    """vLLM samples batches first_batch, first_batch + 1, ... from policy `version` (0, or resumed) at policy_path."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=policy_path,
        dtype="bfloat16" if args.bf16 else "float32",
        seed=args.seed,
        max_model_len=max_model_len,
        enforce_eager=not torch.cuda.is_available(),  # CUDA graphs on GPUs; on a CPU compiling only slows the start
        enable_prefix_caching=False,
        logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
        gpu_memory_utilization=vllm_share_of_gpu_0(args, policy_path),  # docs/gpus.md, Memory
        async_scheduling=args.vllm_async_scheduling,  # off on a CPU whatever we ask (vllm/platforms/cpu.py)
    )
    queues.samples.put(Ready())  # on a GPU it shares, the trainer may allocate now: vLLM has sized its KV cache
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    train_prompts, eval_prompts = prompts
    eval_prompt_ids = tokenize(tokenizer, eval_prompts)
    spans, checks = [], []  # sent with the next batch: see Batch

    def generate(prompt_ids, n, seed, temperature=args.temperature, max_tokens=args.response_length, logprobs=0):
        # One seed per prompt: what a prompt samples depends on the weights and its seed alone. Prompts go in as the
        # trainer's token ids, so vLLM adds no special tokens of its own. logprobs=0: the sampled token's alone.
        params = [
            SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed + j, logprobs=logprobs)
            for j in range(len(prompt_ids))
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        completions = [c for o in outputs for c in o.outputs]  # the n samples of a prompt side by side
        vllm_logprobs = [logprobs_of(c.token_ids, c.logprobs) for c in completions] if logprobs == 0 else None
        return [list(c.token_ids) for c in completions], vllm_logprobs

    def evaluate(version: int):
        t = time.time()
        length = args.eval_response_length or args.response_length
        greedy, _ = generate(eval_prompt_ids, n=1, seed=0, temperature=0.0, max_tokens=length, logprobs=None)
        sampled = generate(eval_prompt_ids, n=1, seed=0)  # one as in training, for the KL of this version: measure_kl
        queues.samples.put(Evaluation(version, eval_prompts, eval_prompt_ids, greedy, *sampled))  # now: a checkpoint
        spans.append(("eval", t, time.time()))  # may need it before the next batch

    if evaluated(args, version):
        evaluate(version)  # the starting policy, loaded from disk
    for index in range(first_batch, args.num_steps + 1):
        stop_if_trainer_stopped(queues.stop)
        # Take the snapshots the trainer pushed, in order, up to the version that samples this batch (after the last
        # batch: the final policy, to evaluate it). Load those the push rule names, check each against its probe.
        target = sampling_version(args, index) if index < args.num_steps else args.num_steps
        while version < target:
            snapshot = next_snapshot(queues, spans)
            version = snapshot.version
            if needed(args, version):
                t = time.time()
                load_weights_into_vllm(llm, unpack_weights(*snapshot.packed))
                if snapshot.probe.response_ids:  # empty when every completion was a lone EOS: nothing to check
                    checks.append((version, probe_gap(llm, snapshot.probe)))
                spans.append(("load", t, time.time()))
            del snapshot  # the trainer's memory: let go of it before the trainer may make the next
            queues.snapshot_free.release()
            if evaluated(args, version):
                evaluate(version)
        if index == args.num_steps:
            break
        t = time.time()
        batch_texts = batch_prompts(args, train_prompts, index)
        prompt_ids = tokenize(tokenizer, batch_texts)
        seed = (args.seed * MAX_BATCHES + index) * args.batch_size
        response_ids, vllm_logprobs = generate(prompt_ids, n=args.num_samples, seed=seed)
        spans.append(("generate", t, time.time()))
        queues.samples.put(Batch(version, batch_texts, prompt_ids, response_ids, vllm_logprobs, spans, checks))
        spans, checks = [], []  # new lists: the queue pickles the old ones in the background
    queues.samples.put(Done(spans, checks))


# ----------------------------------------------------------------------------------------------------
# The weight-sync check. After each load of pushed weights vLLM scores a probe completion the trainer scored with
# them; and at lag 0 the trainer's log-probs of a batch's tokens must be vLLM's. A gap beyond float error (dropout is
# zeroed; vLLM's float32 attention keeps full precision on GPUs) means vLLM is not serving what was pushed: stop.
@dataclass
class Probe:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # the trainer's, at temperature 1: vLLM's prompt log-probs skip temperature


def check_weight_sync(args: Args, gap: float, version: int, probe: bool = False):
    """Stop where vLLM's and the trainer's log-probs should agree up to float error (lag 0, probe), but don't."""
    tolerance = args.logprob_gap_tolerance or (0.1 if args.bf16 else 1e-3)  # None: the default (it must be > 0)
    if gap > tolerance:
        raise WeightSyncError(gap, tolerance, version, probe, args.vllm_async_scheduling and torch.cuda.is_available())


def check_reloads(args: Args, checks: list[tuple[int, float]]):
    """The generator's (version, probe gap) of each snapshot it loaded. A sync run also checks each push at lag 0."""
    for version, gap in checks:
        check_weight_sync(args, gap, version, probe=True)


# ----------------------------------------------------------------------------------------------------
# The trainer: R data-parallel ranks. Rank 0 also trades with the generator (`link`) and writes the run folder (`run`).
def train(args: Args, rank: int, device, starting_point: "StartingPoint", run=None, link=None):
    R, is_rank_0 = args.trainer_ranks, rank == 0
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    # The policy (resumed: the checkpoint's), the frozen reference where it started (FSDP2: 1/R per rank), the rewards.
    policy, wrapped_policy, ref_policy = load_policies(args, starting_point, device)
    reward_fn, gold_fn = load_rewards(args, starting_point, device, is_rank_0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    updates = args.num_steps * args.updates_per_batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1 - update / updates)
    first_step = restore_checkpoint(args, starting_point.state, policy, optimizer, scheduler)  # 0 for a new run
    P, k = args.batch_size // R, args.num_samples  # prompts per rank, completions per prompt

    for step in range(first_step, args.num_steps):
        # 1. Get a batch: rank 0 takes it from the generator (it was sampled by version sampling_version(step)) and
        #    hands it to the other ranks. Each keeps its share: P prompts and their k completions each, side by side.
        t_start = time.time()
        batch: Batch = from_rank_0(link.next_batch() if is_rank_0 else None)
        t_batch = time.time()
        check_reloads(args, batch.checks)  # the weights that sampled it, as vLLM loaded them
        prompts, prompt_ids, responses, vllm_logprobs = rank_share(batch, rank, P, k)  # of each of its P·k completions
        eval_kls = measure_kl(args, ref_policy, batch.evals, device)  # of the versions the generator evaluated

        # 2. Score each completion (no EOS: the penalty instead). The reference's log-probs, once per batch, give the
        #    sampler's KL Σ_t log π_old - log π_ref (logged as in the paper's code), which RLOO's reward also charges.
        has_eos = torch.tensor(ended(responses, starting_point.eos_ids))
        rewards = torch.tensor(reward_fn(prompts, prompt_ids, responses), dtype=torch.float)  # (P·k,)
        scores = apply_missing_eos_penalty(rewards, has_eos, args.missing_eos_penalty).view(P, k)
        ref_logps = reference_logprobs(ref_policy, prompt_ids, responses, args, device)  # (P·k,)
        old_logps = torch.tensor([sum(row) for row in vllm_logprobs])  # log π_old(y|x), from vLLM
        kl = old_logps - ref_logps
        advantages = rloo_advantages(scores - args.kl_coef * kl.view(P, k)).flatten()  # used by RLOO alone

        # 3. What the loss learns from, as indices into the P·k completions (a tie says nothing about which is better).
        #    Every rank runs as many micro-batches (DDP and FSDP exchange data in each): is_real 0 weighs out padding.
        best, worst, valid = select_pairs(scores)  # of each prompt
        if args.loss_type in ("sigmoid", "ipo"):  # the best (chosen) and worst (rejected) where the k scores differ
            chosen, rejected = best[valid].tolist(), worst[valid].tolist()
            chosen, rejected, is_real, all_terms = pad_pairs_over_ranks(chosen, rejected)
        elif args.loss_type == "best_of_k":  # the chosen of every prompt, tie or not, as the paper's code
            chosen, is_real, all_terms = best.tolist(), torch.ones(P), R * P
        else:  # RLOO: every completion
            completions, is_real, all_terms = list(range(P * k)), torch.ones(P * k), R * P * k

        # 4. The loss, E updates on this batch. DDP and FSDP average gradients over ranks, so a rank scales its summed
        #    loss by R / (terms in the whole batch): each update is the mean over all terms, whatever micro-batch or R.
        logprobs_of = partial(completion_logprobs, wrapped_policy, prompt_ids, responses, args=args, device=device)
        lr = scheduler.get_last_lr()[0]  # that of the first update
        per_term, grad_norms, first_update = defaultdict(list), [], []  # first_update: for the weight-sync check, 5.
        for update in range(args.updates_per_batch):
            for begin in range(0, len(is_real), args.micro_batch_size):
                mb = slice(begin, begin + args.micro_batch_size)
                (real,) = to_device(device, is_real[mb])
                if args.loss_type in ("sigmoid", "ipo"):  # online DPO: the chosen and the rejected, in one forward pass
                    rows = chosen[mb] + rejected[mb]
                    logps, token_logps, mask = logprobs_of(rows)
                    chosen_logps, rejected_logps = logps.chunk(2)
                    ref_chosen, ref_rejected = to_device(device, ref_logps[chosen[mb]], ref_logps[rejected[mb]])
                    losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, args.beta, args.loss_type)
                    margin = args.beta * ((chosen_logps - ref_chosen) - (rejected_logps - ref_rejected))
                    stats = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "margin": margin}
                    # The off-policy correction, --tis_cap (off: w = 1, the loss as it was): each pair's truncated ratio
                    (sampler,) = to_device(device, old_logps[chosen[mb]] + old_logps[rejected[mb]])
                    pair_logps = chosen_logps + rejected_logps
                    ratio = tis_ratio(pair_logps, sampler, args.tis_cap)
                    losses = losses * ratio
                    logged = {"tis_ratio": ratio, "pair_logps": pair_logps, "sampler_logps": sampler}
                    stats |= logged if args.tis_cap is not None else {}  # gathered over ranks: only when it is on
                elif args.loss_type == "rloo":  # RLOO: every completion, π_old being the sampler
                    rows = completions[mb]
                    logps, token_logps, mask = logprobs_of(rows)
                    old, advantage = to_device(device, old_logps[rows], advantages[rows])
                    losses, ratio, clipped = rloo_loss(logps, old, advantage, args.clip_range)
                    stats = {"ratio": ratio, "clipped": clipped.float()}
                else:  # best-of-k: SFT on the chosen
                    rows = chosen[mb]
                    logps, token_logps, mask = logprobs_of(rows)
                    losses, stats = best_of_k_loss(logps), {"chosen_logps": logps}
                ((losses * real).sum() * R / all_terms).backward()
                for name, value in {"loss": losses, **stats, "is_real": real}.items():  # on the device until the step
                    per_term[name].append(value.detach().float())  # ends: a copy to the CPU waits for the GPU
                if update == 0:  # the batch as it arrived; later updates see a policy that has learned from it
                    first_update.append((token_logps.detach(), mask, rows, real))
            grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm))
            optimizer.step()  # with every pair tied there are no gradients, and AdamW leaves the weights be
            scheduler.step()
            optimizer.zero_grad()
        kept = torch.cat(per_term.pop("is_real", [torch.zeros(0)])) > 0  # the real terms; none if every pair tied
        per_term = {name: torch.cat(values)[kept].cpu() for name, values in per_term.items()}
        t_trained = time.time()

        # 5. The weight-sync check (lag 0), before any push; at lag > 0 the gap measures how off-policy the batch is.
        logprob_gap = batch_logprob_gap(first_update, vllm_logprobs, device)  # NaN if DPO's pairs all tied
        if batch.version == step:
            check_weight_sync(args, logprob_gap, step)

        # 6. Push the new weights, if the generator will load them (the push rule): one buffer, and a probe (Snapshot).
        t_push = t_trained  # when the push began, once the generator was done with the last snapshot
        if needed(args, step + 1):
            t_push = push_weights(args, is_rank_0, step + 1, policy, batch, device, link)

        # 7. Log the step (all ranks' shares) and the evaluations that came with its batch; now and then, checkpoint.
        per_completion = {"scores": scores, "rewards": rewards, "has_eos": has_eos.float(), "kl": kl}
        per_completion |= {"valid": valid.float(), "advantages": advantages}
        metrics = step_metrics(args, step, batch, per_completion, per_term, grad_norms, lr, logprob_gap)
        if is_rank_0:
            run.log_step(step, metrics, batch, StepTimes(t_start, t_batch, t_trained, t_push, time.time()))
            run.log_generator(batch, eval_kls, gold_fn)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args, is_rank_0, step + 1, policy, optimizer, scheduler, run, link)

    final_state_dict = full_state_dict(args, is_rank_0, policy)  # under FSDP every rank helps gather them
    done: Done = from_rank_0(link.finish() if is_rank_0 else None)  # with the final policy's evaluation
    eval_kls = measure_kl(args, ref_policy, done.evals, device)
    if is_rank_0:
        check_reloads(args, done.checks)
        run.log_generator(done, eval_kls, gold_fn)
        run.save_model(policy, final_state_dict)


def step_metrics(args: Args, step: int, batch: Batch, per_completion, per_term, grad_norms, lr, logprob_gap) -> dict:
    """What a step logs (docs/metrics.md), over all ranks' shares, computed on every rank: per_completion holds a value
    per completion (per prompt: scores, valid), per_term one per loss term of each micro-batch of each update."""
    per_completion, per_term = gather_shares(args.trainer_ranks, per_completion, per_term)

    def mean(name: str) -> float:  # NaN where there was nothing to average: DPO with every pair tied
        return per_term[name].mean().item() if name in per_term else float("nan")

    metrics = {
        "async/learner_version": step,
        "async/batch_version": batch.version,
        "async/lag": step - batch.version,  # updates between the sampling policy and the one trained
        "async/logprob_gap": logprob_gap,  # mean |log π_trainer - log π_vLLM| per sampled token
        "async/reload_gap": max((gap for _, gap in batch.checks), default=float("nan")),  # of the probe, per load
        "objective/loss": mean("loss"),
        "objective/kl": per_completion["kl"].mean().item(),  # Σ_t log π_old - log π_ref of the sampled completions
        "objective/grad_norm": sum(g.item() for g in grad_norms) / len(grad_norms),
        "objective/lr": lr,
        "rewards/score": per_completion["scores"].mean().item(),  # the reward, with the missing-EOS penalty
        "rewards/unpenalized": per_completion["rewards"].mean().item(),  # the reward, without it
        "rewards/chosen_score": per_completion["scores"].max(1).values.mean().item(),
        "rewards/rejected_score": per_completion["scores"].min(1).values.mean().item(),
        "rewards/missing_eos_frac": 1 - per_completion["has_eos"].mean().item(),
        "rewards/tie_frac": 1 - per_completion["valid"].mean().item(),  # prompts whose k scores are all equal
    }
    if args.loss_type in ("sigmoid", "ipo"):
        metrics["rewards/dpo_margin"] = mean("margin")  # β times the log-ratio difference: DPO's implicit reward
        metrics["rewards/dpo_accuracy"] = (per_term["margin"] > 0).float().mean().item() if per_term else float("nan")
        metrics["logps/chosen"] = mean("chosen_logps")
        metrics["logps/rejected"] = mean("rejected_logps")
        if args.tis_cap is not None:  # the correction's mean ratio, and each pair's, to check by hand (docs/metrics.md)
            metrics["offpolicy/tis_ratio"] = mean("tis_ratio")
            metrics["offpolicy/pairs"] = pair_records(per_term)
    elif args.loss_type == "rloo":
        charged = per_completion["scores"].flatten() - args.kl_coef * per_completion["kl"]  # with its KL charge
        metrics["rloo/reward"] = charged.mean().item()
        metrics["rloo/advantage_std"] = per_completion["advantages"].std().item()
        metrics["rloo/ratio"] = mean("ratio")  # π_θ / π_old of the sampled completions, over the updates
        metrics["rloo/clipped_frac"] = mean("clipped")
    else:
        metrics["logps/chosen"] = mean("chosen_logps")
    return metrics


# ----------------------------------------------------------------------------------------------------
# main: one trainer rank of R, from torchrun (one machine or several) or --trainer_ranks R. Rank 0 runs the generator.
def main(args: Args):
    args = checked_args(args)  # with --resume, its flags; on bad input, one sentence naming the fix, before any process
    if args.trainer_ranks > 1 and not UNDER_TORCHRUN:
        return launch_ranks(args)
    t_start = time.time()
    rank = int(os.environ.get("RANK", 0))
    run = link = None
    with rank_lifetime(args, rank) as close_at_exit:  # however it ends: one sentence, and every process stopped
        if rank == 0:
            # The task (policy, prompts, lengths), then the generator, slowest to start: weights come by queue later.
            starting_point = read_starting_point(args)
            prompts, references = load_prompts(args)  # (training, held-out), and the held-out prompts' references
            max_model_len = check_lengths(args, starting_point, *prompts)
            plan_gpu_memory(args, starting_point, max_model_len)  # GPUs: what each needs, and a warning if too much
            queues = new_queues()
            link = close_at_exit(start_generator(args, queues, starting_point, prompts, max_model_len))
            run = close_at_exit(RunFolder(args, starting_point, references, t_start))
        device = join_trainer_ranks(args, rank)  # its GPU or its cores; the other ranks wait for rank 0's warm start
        if rank != 0:
            starting_point = read_starting_point(args)
        train(args, rank, device, starting_point, run, link)
    if rank == 0:
        run.summarize(link.snapshot_gb)  # where the time went, printed and in summary.json


# ====================================================================================================
# PART II: SUPPORT CODE. A first reading can stop here.
# The method is all above. Below are the built-in task and its warm start; prompts, datasets and rewards;
# the input checks; the run folder (logs, TensorBoard, W&B, checkpoints and resume); and process plumbing.
# ====================================================================================================


# ----------------------------------------------------------------------------------------------------
# The built-in task: sort the letters. Prompt "dbca=", answer "abcd" then EOS. The gold reward gives
# partial credit, 1 - (edit distance to the sorted letters) / (length of the longer string), in [0, 1]:
# each letter missing, extra or wrong costs about the same, so a near miss scores close to a hit.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LETTERS = 4
MAX_LETTERS = 12


def builtin_prompts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(LETTERS, k=rng.randint(MIN_LETTERS, MAX_LETTERS))) + "=" for _ in range(n)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions that turn a into b."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
    return row[-1]


def builtin_reward(prompts: list[str], completions: list[str]) -> list[float]:
    rewards = []
    for prompt, completion in zip(prompts, completions):
        target = "".join(sorted(prompt.removesuffix("=")))
        rewards.append(1 - edit_distance(completion, target) / max(len(target), len(completion)))
    return rewards


# The built-in policy's sizes (--model_size): Llamas of 2.7 M, 10.6 M and 29.0 M parameters that differ in width
# alone (6 layers, 64 dimensions a head), so that one warm-start recipe trains the larger ones further, as a scale
# should: deeper models learn more slowly in 30 steps.
BUILTIN_SIZES = {
    "3m": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=3),
    "10m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6),
    "30m": dict(hidden_size=640, intermediate_size=1664, num_hidden_layers=6, num_attention_heads=10),
}


def warm_start(args: Args) -> str:
    """With no --model_name_or_path we build a Llama of --model_size and a character tokenizer here, and teach it
    the task briefly with supervised learning, to an imperfect SFT policy; every size gets the same recipe.
    save_pretrained makes it an ordinary model folder that vLLM and transformers both load."""
    path = os.path.join(args.cache_dir, f"builtin-sort-{args.model_size}-sft{args.sft_steps}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    print(
        f"warm start: building the built-in {args.model_size} model and training it for {args.sft_steps} SFT steps "
        "(once, then cached)"
    )
    vocab = {"<pad>": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate(LETTERS + "=")}
    char_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    char_level.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_level, pad_token="<pad>", eos_token="</s>")
    size = BUILTIN_SIZES[args.model_size]
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1)
    config = LlamaConfig(
        vocab_size=len(vocab), max_position_embeddings=64, tie_word_embeddings=False, **size, **special
    )
    torch.manual_seed(0)  # one SFT model shared by every seed, as in the paper
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / args.sft_steps)
    rng = random.Random("sft")
    for _ in range(args.sft_steps):
        prompts = builtin_prompts(rng, 64)
        targets = ["".join(sorted(p[:-1])) for p in prompts]
        answers = [ids + [tokenizer.eos_token_id] for ids in tokenize(tokenizer, targets)]
        input_ids, attention_mask = pad_batch(tokenize(tokenizer, prompts), answers)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, : -max(map(len, answers))] = -100  # learn the answers only: prompts fill the columns before them
        positions = position_ids(attention_mask)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, labels=labels).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a half-written model folder is never picked up
    return path


# ----------------------------------------------------------------------------------------------------
# Prompts and rewards: a dataset loaded with `datasets` (or the built-in task's), a reward function or model.
def load_split(args: Args, split: str, streaming: bool = False):
    from datasets import load_dataset

    if os.path.isfile(args.dataset):
        return load_dataset("json", data_files=args.dataset, split=split, streaming=streaming)
    return load_dataset(args.dataset, split=split, streaming=streaming)


def load_prompts(args: Args):
    """(Training prompts, held-out prompts), and the held-out prompts' references. The built-in task has no references,
    and no list of training prompts (None): it draws them per batch."""
    if not args.dataset:
        return (None, builtin_prompts(random.Random("eval"), args.eval_prompts)), None
    train = load_split(args, args.dataset_split)
    if args.eval_split:
        held_out = load_split(args, args.eval_split)
        held_out = held_out.select(range(min(args.eval_prompts, len(held_out))))
    else:  # the last rows are held out for evaluation
        cut = max(0, len(train) - args.eval_prompts)
        held_out = train.select(range(cut, len(train)))
        train = train.select(range(cut))
    references = list(held_out[args.reference_column]) if args.reference_column else None
    return (list(train[args.prompt_column]), list(held_out[args.prompt_column])), references


# Prompt j of batch i samples with seed (--seed * MAX_BATCHES + i) * --batch_size + j (see the generator), so that no
# two prompts share a sampling seed, in one run or across seeds, while runs stay under MAX_BATCHES batches.
MAX_BATCHES = 10**6


def batch_prompts(args: Args, train_prompts, index: int) -> list[str]:
    """The prompts of batch `index`, a function of seed and index alone: a resumed run sees the same data."""
    if train_prompts is None:
        return builtin_prompts(random.Random(f"train-{args.seed}-{index}"), args.batch_size)
    order = shuffled(args.seed, len(train_prompts))  # one shuffle of the dataset, cycled
    return [train_prompts[order[i % len(order)]] for i in range(index * args.batch_size, (index + 1) * args.batch_size)]


@cache
def shuffled(seed: int, n: int) -> list[int]:
    return random.Random(seed).sample(range(n), n)


def tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Texts to token ids as written: no special tokens are added, as in TRL. A chat template already puts BOS
    in a prompt, and a tokenizer that added another would give the model two. vLLM gets these very ids."""
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def stop_token_ids(model_path: str, tokenizer) -> set[int]:
    """The ids vLLM stops at: the tokenizer's EOS and the generation config's (Llama 3 chat stops at <|eot_id|>)."""
    try:
        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json: transformers and vLLM fall back on the model config
        eos = AutoConfig.from_pretrained(model_path).eos_token_id
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}


def import_reward_fn(args: Args):
    """--reward_fn module:function, or the built-in task's reward."""
    if not args.reward_fn:
        return builtin_reward
    module, _, name = args.reward_fn.partition(":")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


def load_reward(args: Args, model_path: str, device, tokenizer, eos_ids: set[int]):
    """score(prompts, prompt_ids, response_ids) -> one float per completion, from the policy's token ids.

    A reward function gets text: the completion decoded without special tokens. A reward model gets what the
    TL;DR reward models were trained on, the response *with* its EOS (where it has one), whose score they read
    at that last token: with the policy's tokenizer, the policy's own ids, as the paper's code scores them;
    with another tokenizer, the text tokenized as that tokenizer does by default (its BOS, once), plus its EOS
    if the completion ended. Reward models that read their score at the first token (BERT-style) don't fit."""
    if not model_path:
        reward_fn = import_reward_fn(args)
        return lambda prompts, prompt_ids, response_ids: reward_fn(
            prompts, tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        )
    rm_tokenizer = AutoTokenizer.from_pretrained(model_path)
    same_tokens = rm_tokenizer.get_vocab() == tokenizer.get_vocab()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype).to(device).eval()
    # transformers reads the score at the rightmost token that is not padding. Sequences are left-padded, so
    # that token is in the last column, and pad id -1, which no token has, keeps it from skipping a final EOS
    # that doubles as the pad token (a tokenizer without one), as it would with right padding.
    model.config.pad_token_id = model.config.get_text_config().pad_token_id = -1

    def rm_tokens(text: str, stopped: bool) -> list[int]:
        ids = rm_tokenizer(text)["input_ids"]
        bos, eos = rm_tokenizer.bos_token_id, rm_tokenizer.eos_token_id
        if bos is not None and ids[:2] == [bos, bos]:  # the prompt had its BOS already
            ids = ids[1:]
        if stopped and eos is not None and ids[-1:] != [eos]:
            ids = ids + [eos]
        return ids

    @torch.no_grad()
    def reward_model(prompts, prompt_ids, response_ids):
        if same_tokens:
            sequences = [p + r for p, r in zip(prompt_ids, response_ids)]
        else:
            completions = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
            texts = [p + c for p, c in zip(prompts, completions)]
            sequences = [rm_tokens(text, e) for text, e in zip(texts, ended(response_ids, eos_ids))]
        scores = []
        for start in range(0, len(sequences), args.micro_batch_size):
            chunk = sequences[start : start + args.micro_batch_size]
            ids, mask = (t.to(device) for t in pad_batch(chunk, [[]] * len(chunk)))
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            scores += logits[:, 0].float().tolist()
        return scores

    return reward_model


# ----------------------------------------------------------------------------------------------------
# The trainer's tensors and models.
def pad_batch(prompts: list[list[int]], responses: list[list[int]]):
    """Token lists -> (B, prompt width + response width) ids and attention mask, prompts padded on the left and
    responses on the right, so every response starts in the same column. Pad id 0 is masked out (a pad id past
    the vocabulary fails on GPUs)."""
    prompt_width, response_width = max(map(len, prompts)), max(map(len, responses))
    ids = torch.zeros(len(prompts), prompt_width + response_width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, prompt_width - len(p) : prompt_width + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, prompt_width - len(p) : prompt_width + len(r)] = 1
    return ids, mask


def pair_records(per_term: dict) -> list[list[float]]:
    """[log π_θ(y_c|x) + log π_θ(y_r|x), the same under the sampler (vLLM's), tis_ratio] of each pair of the step, in
    every update: what a reader needs to recompute the ratio by hand."""
    if not per_term:  # every pair tied
        return []
    return torch.stack([per_term[name] for name in ("pair_logps", "sampler_logps", "tis_ratio")], 1).tolist()


def to_device(device, *tensors) -> tuple:
    """The tensors on the device. To a GPU through pinned memory, without waiting: a copy from ordinary (pageable)
    memory first waits for all the work queued on the GPU (ATen's copy_kernel_cuda, memcpy_and_sync)."""
    if device.type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


def position_ids(attention_mask):
    """Positions that start at 0 after the left padding: a padded row is computed as it would be alone."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def reference_logprobs(ref_policy, prompt_ids, response_ids, args: Args, device):
    """log π_ref(y|x) of each completion, without gradients, as many at a time as a DPO micro-batch holds."""
    chunk = 2 * args.micro_batch_size
    sums = []
    for begin in range(0, len(response_ids), chunk):
        rows = range(begin, min(begin + chunk, len(response_ids)))
        logps, _, _ = completion_logprobs(ref_policy, prompt_ids, response_ids, rows, args, device)
        sums.append(logps.float())
    return torch.cat(sums).cpu()  # one copy: a copy to the CPU waits for the GPU


def measure_kl(args: Args, ref_policy, evals: list[Evaluation], device) -> list[float]:
    """KL(π_v || π_ref) of each evaluated version v (train(), phase 1), by the estimator of the paper's training KL:
    the mean over held-out prompts of Σ_t log π_v - log π_ref of a completion π_v sampled. Every rank computes it whole
    (FSDP needs all of them in each forward pass). NaN for an evaluation restored from an older version's checkpoint:
    it has no samples."""
    kls = [float("nan")] * len(evals)
    for i, e in enumerate(evals):
        if e.sampled_ids is not None:
            ref = reference_logprobs(ref_policy, e.prompt_ids, e.sampled_ids, args, device)
            kls[i] = (torch.tensor([sum(row) for row in e.sampled_logprobs]) - ref).mean().item()
    return kls


def pad_pairs_over_ranks(chosen: list[int], rejected: list[int]):
    """DPO's pairs padded to the most any rank has, with copies of the first (or of completion 0) that weigh 0, so
    that every rank runs as many micro-batches. Returns them, each pair's weight (1 or 0), and the real pairs over
    all ranks."""
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, len(chosen))
    missing = max(counts) - len(chosen)
    is_real = torch.tensor([1.0] * len(chosen) + [0.0] * missing)
    return chosen + (chosen[:1] or [0]) * missing, rejected + (rejected[:1] or [0]) * missing, is_real, sum(counts)


def rank_share(batch: Batch, rank: int, P: int, k: int):
    """This rank's P prompts of the batch and their P·k completions: for each completion its prompt text and ids, its
    token ids and vLLM's log-prob of each of its tokens."""
    mine = slice(rank * P * k, (rank + 1) * P * k)
    prompts = [batch.prompts[rank * P + j // k] for j in range(P * k)]
    prompt_ids = [batch.prompt_ids[rank * P + j // k] for j in range(P * k)]
    return prompts, prompt_ids, batch.response_ids[mine], batch.logprobs[mine]


def sampler_gap(token_logps, response_mask, vllm_logprobs: list[list[float]], is_real):
    """Σ over the sampled tokens of real terms (is_real: 1, padding: 0) of |log π_trainer - log π_vLLM|, and the number
    of those tokens. vllm_logprobs[j] holds vLLM's log-probs of row j's response tokens, in order; a term has one row,
    or two (DPO: the chosen rows, then the rejected)."""
    tokens = response_mask.bool()
    real_rows = is_real.repeat(len(token_logps) // len(is_real))
    (vllm_logps,) = to_device(token_logps.device, torch.tensor([x for row in vllm_logprobs for x in row]))
    token_gap = (token_logps.detach()[tokens] - vllm_logps).abs()
    real_tokens = real_rows.repeat_interleave(tokens.sum(1))
    return (token_gap * real_tokens).sum(), real_tokens.sum()


def batch_logprob_gap(first_update: list, vllm_logprobs: list[list[float]], device) -> float:
    """Mean |log π_trainer - log π_vLLM| per sampled token of the batch's real terms, over every rank, from the first
    update's forward passes: (token log-probs, their mask, their rows, is_real) of each micro-batch."""
    gap_sum = gap_tokens = torch.zeros((), device=device)
    for token_logps, mask, rows, real in first_update:
        gap, tokens = sampler_gap(token_logps, mask, [vllm_logprobs[j] for j in rows], real)
        gap_sum, gap_tokens = gap_sum + gap, gap_tokens + tokens
    dist.all_reduce(gap_sum)
    dist.all_reduce(gap_tokens)
    return (gap_sum / gap_tokens).item()


def from_rank_0(obj):
    """obj as rank 0 has it, on every trainer rank."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@dataclass
class StartingPoint:
    """Where a rank starts, each part read once."""

    base_model: str  # the reference policy, where training started (the built-in one is warm-started, then cached)
    policy_path: str  # the policy to train from: base_model, or the newest checkpoint's when resuming
    checkpoint: str | None
    state: dict  # that checkpoint's trainer.pt (optimizer, scheduler, RNG, the batches sampled ahead), or {}
    tokenizer: object
    eos_ids: set[int]  # the ids vLLM stops at


def read_starting_point(args: Args) -> StartingPoint:
    base_model = args.model_name_or_path or warm_start(args)
    checkpoint = latest_checkpoint(args.resume) if args.resume else None
    policy_path = os.path.join(checkpoint, "model") if checkpoint else base_model
    state = read_checkpoint(checkpoint) if checkpoint else {}
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    return StartingPoint(base_model, policy_path, checkpoint, state, tokenizer, stop_token_ids(base_model, tokenizer))


def on_generator_node() -> bool:
    """Whether this process runs on the machine of global rank 0, which hosts the generator: torchrun's node 0."""
    return int(os.environ.get("GROUP_RANK", 0)) == 0


def place_rank(trainer_cores: list[int]):
    """Placement of this rank. GPUs: on the generator's machine, local rank r trains on GPU r + 1, as GPU 0 is the
    generator's (on a one-GPU machine they share it); on the other machines, on GPU r. CPUs: each rank is pinned
    to its own share of this machine's trainer cores, apart from the generator's."""
    local_rank, local_ranks = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        first = 1 if on_generator_node() and torch.cuda.device_count() > 1 else 0
        device = torch.device(f"cuda:{local_rank + first}")
        torch.cuda.set_device(device)
        return device
    pin_to_cores(trainer_cores[local_rank::local_ranks] or trainer_cores)
    return torch.device("cpu")


def join_trainer_ranks(args: Args, rank: int):
    """This rank's device (place_rank), then the process group of the trainer ranks: under torchrun, at the address it
    gives (MASTER_ADDR, MASTER_PORT); a lone `python async_online_dpo.py` is a group of one, which needs no address.
    Then the ranks wait for rank 0 to have built the warm start: they find it, or build the same on their machine."""
    device = place_rank(split_cpu_cores(args.cpu_share_cores)[1])
    if device.type == "cuda" and on_generator_node() and torch.cuda.device_count() == 1:
        # On a GPU it shares with vLLM, the trainer keeps out of vLLM's share and of the slack beyond it: if it runs
        # out, it fails with its own traceback, not vLLM in mid-generation.
        vllm_share = args.vllm_gpu_memory_utilization or SHARED_GPU_VLLM_SHARE
        torch.cuda.set_per_process_memory_fraction(1 - vllm_share - SHARED_GPU_SLACK, device)
    store = None if UNDER_TORCHRUN else dist.HashStore()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    # device_id binds NCCL to this rank's GPU and forms its communicator here, at once, not at the first collective:
    # without it, the barrier below guesses the device, and says so (torch distributed_c10d.py, barrier).
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=args.trainer_ranks, timeout=timeout, device_id=device_id
    )
    dist.barrier()
    return device


def load_policy(path: str, device, gradient_checkpointing: bool, sharded: bool = False, mp_policy=None):
    """The policy, ready to train. Train mode, since transformers recomputes activations under gradient
    checkpointing only in train mode; but every dropout probability is 0, as in the paper's code and TRL, so
    that its log-probs are those of the reference and of vLLM. Dropout kept in the config (attention dropout,
    read when a layer is built) is zeroed before loading, dropout modules after. `sharded`: with FSDP2, and its
    mixed precision (load_sharded)."""
    config = AutoConfig.from_pretrained(path)
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    if sharded:
        policy = load_sharded(path, config, torch.float32, device, mp_policy=mp_policy)
    else:
        policy = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).to(device)
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy.train()


def load_policies(args: Args, starting_point: StartingPoint, device):
    """The policy to train (float32; from the checkpoint on resume), the model its forward passes go through (DDP,
    which averages gradients over ranks in backward, or the FSDP2-sharded policy itself), and the frozen reference
    in vLLM's dtype."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    path, base_model = starting_point.policy_path, starting_point.base_model
    if not args.fsdp:
        policy = load_policy(path, device, args.gradient_checkpointing)
        ref_policy = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device)
        # The gradients are views into DDP's buckets, not copies beside them: one float32 copy of the policy less.
        wrapped_policy = DistributedDataParallel(policy, gradient_as_bucket_view=True)
        return policy, wrapped_policy, ref_policy.eval().requires_grad_(False)
    # FSDP2: a rank keeps 1/R of every weight, gradient and Adam moment. Under --bf16 the policy's weights are gathered
    # in bfloat16 (the dtype autocast computes in), and its gradients reduced in float32.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mixed_precision = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    )
    policy = load_policy(path, device, args.gradient_checkpointing, sharded=True, mp_policy=mixed_precision)
    # The reference never runs backward, which is where FSDP2 frees the root's gathered weights (embeddings, head):
    # it frees them after each forward pass instead (torch fsdp/_fully_shard/_fsdp_state.py, _lazy_init).
    ref_policy = load_sharded(base_model, AutoConfig.from_pretrained(base_model), dtype, device, reshard_root=True)
    return policy, policy, ref_policy.eval().requires_grad_(False)


def load_sharded(path: str, config, dtype, device, mp_policy=None, reshard_root=None):
    """A model sharded with FSDP2, without its whole on any device, nor in any rank's memory but rank 0's (where
    torch's fully_shard would start from: it shards what it is given). Every rank builds the model on the meta
    device and shards it (shard); rank 0 reads the weights into CPU memory, and every rank takes its shard of each
    weight from it, one weight at a time (torch distributed/checkpoint/state_dict.py, set_model_state_dict with
    broadcast_from_rank0). Buffers are in no state dict that way (a rotary table is computed as a model is built,
    not saved), so they come from rank 0 too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype) if dist.get_rank() == 0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shard(model, mp_policy, reshard_root)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, whole.state_dict() if whole else {}, options=options)
    for name, buffer in model.named_buffers():
        if whole is not None:
            buffer.copy_(whole.get_buffer(name))
        dist.broadcast(buffer, src=0)
    return model


def load_rewards(args: Args, starting_point: StartingPoint, device, is_rank_0: bool):
    """The training reward, with which each rank scores its share, and the gold reward that scores the evaluations (on
    rank 0): --gold_reward_model_path, or else the training reward."""
    tokenizer, eos_ids = starting_point.tokenizer, starting_point.eos_ids
    reward_fn = load_reward(args, args.reward_model_path, device, tokenizer, eos_ids)
    if not (args.gold_reward_model_path and is_rank_0):
        return reward_fn, reward_fn
    return reward_fn, load_reward(args, args.gold_reward_model_path, device, tokenizer, eos_ids)


def shard(model, mp_policy=None, reshard_root=None):
    """FSDP2 over the trainer ranks: each transformer block, then the rest (the root). A block gathers its full
    weights only while it runs; the root keeps its own until the backward pass, unless reshard_root."""
    from torch.distributed.fsdp import fully_shard

    precision = {"mp_policy": mp_policy} if mp_policy else {}
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):
            fully_shard(module, **precision)
    fully_shard(model, reshard_after_forward=reshard_root, **precision)


# ----------------------------------------------------------------------------------------------------
# Input checks, before any process is spawned: each failure is one sentence naming the fix.
def fail(message: str):
    sys.exit(f"error: {message}")


def checked_args(args: Args) -> Args:
    """The flags to run with: with --resume, those the run was started with; under torchrun, its number of ranks. Bad
    input ends the run here with one sentence, before any process is spawned."""
    args = resumed_args(args)
    if UNDER_TORCHRUN:
        args = replace(args, trainer_ranks=int(os.environ["WORLD_SIZE"]))
    check_args(args)
    return args


def resumed_args(args: Args) -> Args:
    """With --resume, the flags the run was started with, read from its args.json."""
    if not args.resume:
        return args
    if not os.path.isdir(args.resume):
        fail(
            f"--resume {args.resume!r} is not a folder; give the folder of the run to continue, as the run printed it."
        )
    if not latest_checkpoint(args.resume):
        fail(f"--resume {args.resume!r} has no checkpoint-* folder; start runs with --save_every N to write them.")
    with open(os.path.join(args.resume, "args.json")) as f:
        saved = json.load(f)
    known = {name: value for name, value in saved.items() if name in Args.__dataclass_fields__}  # flags since gone
    return Args(**{**known, "resume": args.resume})


def describe(args: Args) -> str:
    """The run in words, for its first printed line."""
    N, A = args.batches_per_round, args.async_steps
    lags = f"lag {N * A}" if N == 1 else f"lags {N * A}..{N * A + N - 1}"
    mode = f"async, {A} round(s) of {N} batch(es) ahead" if A else f"synchronous, rounds of {N} batch(es)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (
        f"{mode} ({lags}), {args.loss_type} loss, {args.updates_per_batch} update(s) a batch; "
        f"{args.trainer_ranks} trainer rank(s) on {device}"
    )


def check_args(args: Args):
    gpus, cores = torch.cuda.device_count(), len(split_cpu_cores(share=True)[0])
    sizes = ["num_steps", "batch_size", "micro_batch_size", "response_length", "eval_every", "eval_prompts"]
    sizes += ["updates_per_batch", "batches_per_round", "trainer_ranks", "dist_timeout"]
    sizes += ["eval_response_length"] * (args.eval_response_length is not None)
    for size in sizes:
        if getattr(args, size) < 1:
            fail(f"--{size} is {getattr(args, size)}; it must be at least 1.")
    if args.eval_every_at_end < 0:
        fail(f"--eval_every_at_end is {args.eval_every_at_end}; it must be 0 (off) or at least 1.")
    R, N = args.trainer_ranks, args.batches_per_round
    here = int(os.environ.get("LOCAL_WORLD_SIZE", R))  # the ranks on this machine
    needs_two = {
        "sigmoid": "online DPO compares at least 2 per prompt",
        "ipo": "IPO compares at least 2 per prompt",
        "rloo": "RLOO's leave-one-out baseline needs at least 2 per prompt",
        "best_of_k": "best-of-k picks the best of at least 2 per prompt",
    }
    for wrong, message in [
        (args.num_samples < 2, f"--num_samples is {args.num_samples}, but {needs_two[args.loss_type]}."),
        (args.beta <= 0, f"--beta is {args.beta}; it must be positive (the paper uses 0.1 on TL;DR)."),
        (args.kl_coef < 0, f"--kl_coef is {args.kl_coef}; it must be at least 0 (the paper's RLOO uses 0.05)."),
        (args.clip_range <= 0, f"--clip_range is {args.clip_range}; it must be positive (the paper's RLOO uses 0.2)."),
        (
            args.tis_cap is not None and args.loss_type not in ("sigmoid", "ipo"),
            f"--tis_cap weighs online DPO's pairs, and --loss_type {args.loss_type} has none; drop --tis_cap, or use "
            "--loss_type sigmoid or ipo.",
        ),
        (
            args.tis_cap is not None and args.tis_cap <= 0,
            f"--tis_cap is {args.tis_cap}; it must be positive (truncated IS commonly caps at 2), or None: off.",
        ),
        (
            args.num_steps % N,
            f"--num_steps {args.num_steps} is not a whole number of rounds of --batches_per_round {N}; make it a "
            f"multiple of {N}.",
        ),
        (args.temperature <= 0, "--temperature must be positive (the paper uses 0.7)."),
        (
            min(args.async_steps, args.save_every) < 0,
            "--async_steps (0 = synchronous) and --save_every must be at least 0.",
        ),
        (
            args.logprob_gap_tolerance is not None and args.logprob_gap_tolerance <= 0,
            "--logprob_gap_tolerance must be positive (or None: the default).",
        ),
        (
            args.batch_size % R,
            f"--batch_size {args.batch_size} does not split over --trainer_ranks {R}; make it a multiple of {R}.",
        ),
        (
            gpus and on_generator_node() and here > max(1, gpus - 1),
            f"{here} trainer ranks here need {here + 1} GPUs (GPU 0 is the generator's), but there are {gpus}; run "
            "fewer ranks on this machine (--trainer_ranks, or torchrun's --nproc_per_node).",
        ),
        (
            gpus and not on_generator_node() and here > gpus,
            f"{here} trainer ranks here need {here} GPUs, but there are {gpus}; lower torchrun's --nproc_per_node.",
        ),
        (
            not gpus and here > cores,
            f"{here} trainer ranks are more than the {cores} CPU cores here; run fewer on this machine "
            "(--trainer_ranks, or torchrun's --nproc_per_node).",
        ),
        (args.eval_split and not args.dataset, "--eval_split names a split of --dataset; give --dataset too."),
        (
            not 0 < (args.vllm_gpu_memory_utilization or SHARED_GPU_VLLM_SHARE) < 1 - SHARED_GPU_SLACK,
            f"--vllm_gpu_memory_utilization is {args.vllm_gpu_memory_utilization}; give vLLM's share of GPU 0 as a "
            f"number above 0 and below {1 - SHARED_GPU_SLACK:g} (on one GPU the trainer needs the rest).",
        ),
    ]:
        if wrong:
            fail(message)
    if (args.missing_eos_penalty or 0) > 0:
        print(
            f"warning: --missing_eos_penalty {args.missing_eos_penalty} is positive. Here it replaces the score of a "
            "completion cut off before EOS (the paper's meaning), so cut-off completions score that high; TRL's flag "
            "subtracts it. Give the score you mean, e.g. -1.",
            file=sys.stderr,
        )
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail(
                "--track logs to Weights & Biases, but its client is not installed: pip install wandb, or drop --track."
            )
    check_models(args)
    if args.reward_fn:
        try:
            import_reward_fn(args)
        except (ImportError, AttributeError, ValueError):
            fail(
                f"--reward_fn {args.reward_fn!r} cannot be imported; give it as module:function, importable from here."
            )
    if args.dataset:
        check_dataset(args)


def check_models(args: Args):
    for flag in ("model_name_or_path", "reward_model_path", "gold_reward_model_path"):
        path = getattr(args, flag)
        try:
            architectures = AutoConfig.from_pretrained(path).architectures or [] if path else None
        except (OSError, ValueError):
            fail(
                f"--{flag} {path!r} is not a transformers model folder or hub name; give one written by "
                "save_pretrained."
            )
        if path and "reward" in flag and not any(a.endswith("ForSequenceClassification") for a in architectures):
            fail(
                f"--{flag} {path!r} is a {' / '.join(architectures) or 'model'}, not a sequence-classification reward "
                "model; give one saved from AutoModelForSequenceClassification."
            )


# A --dataset that names one of these is a local file, never a hub dataset: a missing one is a typo, not a download.
DATA_FILES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def check_dataset(args: Args):
    if not os.path.exists(args.dataset) and (args.dataset.endswith(DATA_FILES) or args.dataset.startswith((".", "/"))):
        fail(
            f"--dataset {args.dataset!r} is not a file or folder here (from {os.getcwd()}); check the path, or name a "
            "hub dataset as owner/name."
        )
    for flag in ("dataset_split", "eval_split"):
        split = getattr(args, flag)
        if not split:
            continue
        try:
            columns = load_split(args, split, streaming=True).column_names
        except Exception as error:  # datasets raises many kinds: missing file, unknown split, no network
            fail(
                f"--dataset {args.dataset!r} with --{flag} {split!r} cannot be loaded ({type(error).__name__}); give a "
                "local .json/.jsonl file or folder, or a hub dataset name, and one of its splits."
            )
        for column_flag in ("prompt_column", "reference_column"):
            column = getattr(args, column_flag)
            if column and columns is not None and column not in columns:
                fail(
                    f"--dataset {args.dataset!r} --{flag} {split!r} has no column {column!r} (it has "
                    f"{', '.join(columns)}); name the right one with --{column_flag}."
                )


def check_lengths(args: Args, starting_point: StartingPoint, train_prompts, eval_prompts: list[str]) -> int:
    """Every prompt the run will use, plus a response, must fit in the model's context. Returns the longest
    sequence, for vLLM."""
    if train_prompts is not None and not train_prompts:
        fail(
            f"--dataset {args.dataset!r} has no rows left to train on once --eval_prompts {args.eval_prompts} are held "
            "out; lower --eval_prompts or give --eval_split."
        )
    tokenizer = starting_point.tokenizer
    used = dict.fromkeys(p for i in range(args.num_steps) for p in batch_prompts(args, train_prompts, i))
    prompt_ids = tokenize(tokenizer, eval_prompts + list(used))
    longest_prompt = max(map(len, prompt_ids))
    longest_response = max(args.response_length, args.eval_response_length or 0)
    context = AutoConfig.from_pretrained(starting_point.base_model).max_position_embeddings
    if longest_prompt + longest_response > context:
        fail(
            f"prompts of up to {longest_prompt} tokens plus responses of up to {longest_response} exceed the model's "
            f"context of {context} tokens; lower --response_length or --eval_response_length."
        )
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] and any(ids[:1] != [bos] for ids in prompt_ids):
        print(
            f"warning: this tokenizer adds {tokenizer.bos_token!r} to the start of a text by default, but some prompts "
            "don't start with it. Prompts are used as written; add it to them (a chat template does) if the model "
            "needs it.",
            file=sys.stderr,
        )
    return longest_prompt + longest_response


# ----------------------------------------------------------------------------------------------------
# The run folder, written by rank 0: args.json, metrics.jsonl (one line per step and per evaluation, with the
# timeline the benchmark plots), samples.jsonl (a few evaluation completions), TensorBoard events, W&B when
# --track, checkpoint-*/ and, at the end, model/ and summary.json. A resumed run cuts its logs back to the
# checkpoint and carries on as if it had never stopped.
class RunFolder:
    def __init__(self, args: Args, starting_point: StartingPoint, references, t_start: float):
        self.args = args
        self.tokenizer = starting_point.tokenizer
        self.references = references
        self.eos_ids = starting_point.eos_ids
        checkpoint, state = starting_point.checkpoint, starting_point.state
        self.warm_start_time = time.time() - t_start
        self.dir = args.resume or os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}__{int(time.time())}")
        os.makedirs(self.dir, exist_ok=bool(checkpoint))
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        self.version_time = state.get("version_time", {0: 0.0})  # seconds from the start until version v existed
        self.t_start = t_start - state.get("elapsed", 0.0)
        for name in ("metrics.jsonl", "samples.jsonl") if checkpoint else ():
            os.truncate(os.path.join(self.dir, name), state["offsets"][name])  # forget what came after the checkpoint
        self.metrics_file = open(os.path.join(self.dir, "metrics.jsonl"), "a")
        self.samples_file = open(os.path.join(self.dir, "samples.jsonl"), "a")
        logged = [json.loads(line) for line in open(os.path.join(self.dir, "metrics.jsonl"))]
        self.step_log = [r for r in logged if "step" in r]
        self.eval_log = [r for r in logged if "eval/version" in r]
        self.ref_gold = None  # the gold reward of the references, scored once
        self.load_times = []  # seconds the generator took to load each snapshot it loaded
        if args.track:
            import wandb

            wandb.init(**wandb_settings(args, self.dir))
        from torch.utils.tensorboard import SummaryWriter  # here: the generator and the other ranks never write

        self.writer = SummaryWriter(self.dir, purge_step=state["version"] if checkpoint else None)
        print(f"run {self.dir}: {describe(args)}, policy from {starting_point.policy_path}")

    def log_step(self, step: int, metrics: dict, batch: Batch, times: "StepTimes"):
        """One dict to TensorBoard and metrics.jsonl, and one printed line; then what the generator sent."""
        pairs = {"pairs": metrics.pop("offpolicy/pairs")} if "offpolicy/pairs" in metrics else {}  # to the file alone
        metrics = metrics | {
            "time/wait_samples": times.got_batch - times.began,
            "time/train": times.trained - times.got_batch,
            "time/wait_push": times.push_began - times.trained,
            "time/push_weights": times.pushed - times.push_began,
            "time/step": times.pushed - times.began,
        }
        for span, name in GENERATOR_SPANS.items():  # seconds the generator spent on each kind of work
            metrics[f"time/{name}"] = sum(b - a for what, a, b in batch.spans if what == span)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        t0, t1, t2, t3 = (t - self.t_start for t in (times.began, times.got_batch, times.trained, times.pushed))
        timeline = {  # who did what when, in seconds since the start, for the benchmark's timeline plot
            "generator": [(what, a - self.t_start, b - self.t_start, batch.version) for what, a, b in batch.spans],
            "trainer": [(what, a, b, step) for what, a, b in [("wait", t0, t1), ("train", t1, t2), ("push", t2, t3)]],
        }
        self.version_time[step + 1] = t3
        self.step_log.append(metrics)
        self.metrics_file.write(json.dumps({"step": step, **metrics, **pairs, "timeline": timeline}) + "\n")
        m = metrics
        print(
            f"step {step + 1:3d}/{self.args.num_steps}  policy v{step:<3d} on batch v{batch.version:<3d} "
            f"(lag {m['async/lag']})  loss {m['objective/loss']:.3f}  kl {m['objective/kl']:5.2f}  score "
            f"{m['rewards/score']:.3f}  gen {m['time/generate'] + m['time/load_weights']:.2f}s  train "
            f"{m['time/train'] + m['time/push_weights']:.2f}s  wait {m['time/wait_samples']:.2f}s"
        )

    def log_generator(self, message: "Batch | Done", kls: list[float], gold_fn):
        """The evaluations that came with a batch (or at the end), scored here with the gold reward, with the KL the
        trainer measured of each (measure_kl; NaN where unknown). Then the seconds the loads took, for the summary."""
        for e, kl in zip(message.evals, kls):
            completions = self.tokenizer.batch_decode(e.response_ids, skip_special_tokens=True)
            rewards = gold_fn(e.prompts, e.prompt_ids, e.response_ids)
            row = {"eval/version": e.version, "eval/gold_reward": sum(rewards) / len(rewards), "eval/kl": kl}
            row["eval/wall_time"] = self.version_time[e.version]
            if self.references:  # the paper's win-rate: how often the gold reward prefers ours to the reference
                if self.ref_gold is None:  # whole answers, so with EOS
                    ids = [r + [self.tokenizer.eos_token_id] for r in tokenize(self.tokenizer, self.references)]
                    self.ref_gold = gold_fn(e.prompts, e.prompt_ids, ids)
                wins = [(r > g) + 0.5 * (r == g) for r, g in zip(rewards, self.ref_gold)]
                row["eval/win_rate"] = sum(wins) / len(rewards)
            self.eval_log.append(row)
            for name, value in row.items():
                self.writer.add_scalar(name, value, e.version)
            self.metrics_file.write(json.dumps(row) + "\n")
            shown = list(zip(e.prompts, completions, ended(e.response_ids, self.eos_ids), rewards))[:4]
            for p, c, eos, r in shown:
                sample = {"version": e.version, "prompt": p, "completion": c, "eos": eos, "gold": r}
                self.samples_file.write(json.dumps(sample) + "\n")
            examples = "  ".join((p + c)[-40:] for p, c, _, _ in shown)
            win_rate = f"win rate {row['eval/win_rate']:.3f}  " if "eval/win_rate" in row else ""
            print(
                f"eval  policy v{e.version:<4d} gold reward {row['eval/gold_reward']:.3f}  {win_rate}kl {kl:5.2f}  "
                f"e.g. {examples}"
            )
        self.load_times += [b - a for what, a, b in message.spans if what == "load"]

    def write_checkpoint(self, version: int, policy, state_dict: dict, trainer_state: dict):
        """Everything a resumed run needs, written under a temporary name and renamed in one step when complete:
        a kill during the save leaves the previous checkpoint whole."""
        self.metrics_file.flush()
        self.samples_file.flush()
        trainer_state["offsets"] = {
            "metrics.jsonl": self.metrics_file.tell(),
            "samples.jsonl": self.samples_file.tell(),
        }
        trainer_state |= {"version": version, "version_time": self.version_time, "elapsed": time.time() - self.t_start}
        tmp = os.path.join(self.dir, f".tmp-checkpoint-{version:06d}")
        final = os.path.join(self.dir, f"checkpoint-{version:06d}")
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(os.path.join(tmp, "model"), state_dict=state_dict)
        self.tokenizer.save_pretrained(os.path.join(tmp, "model"))
        torch.save(trainer_state, os.path.join(tmp, "trainer.pt"))
        os.replace(tmp, final)
        for old in glob.glob(os.path.join(self.dir, "checkpoint-*")):
            if old != final:
                shutil.rmtree(old)

    def save_model(self, policy, state_dict: dict):
        """The trained policy as a model folder, which vLLM and transformers load like the one it started from."""
        policy.save_pretrained(os.path.join(self.dir, "model"), state_dict=state_dict)
        self.tokenizer.save_pretrained(os.path.join(self.dir, "model"))

    def close(self):
        if self.args.track:
            import wandb

            wandb.finish()  # here, not at exit: the script ends without Python's teardown (exit_now)
        self.metrics_file.close()
        self.samples_file.close()
        self.writer.close()

    def summarize(self, snapshot_gb: float):
        """Where the time went, per step; written to summary.json and printed."""
        steady = self.step_log[1:] or self.step_log  # step 1 also waits for vLLM to start, so it is left out
        mean = {key: sum(m[key] for m in steady) / len(steady) for key in steady[0] if key.startswith("time/")}
        G = mean["time/generate"] + mean["time/load_weights"] + mean["time/eval"]
        T = mean["time/train"] + mean["time/push_weights"]
        summary = {
            "wall_time": time.time() - self.t_start,
            "warm_start_time": self.warm_start_time,
            "time_per_step": mean["time/step"],
            "generate_per_step": G,
            "train_per_step": T,
            "trainer_wait_per_step": mean["time/wait_samples"],
            "generator_wait_per_step": mean["time/wait_weights"],
            "load_weights_per_step": mean["time/load_weights"],
            "push_weights_per_step": mean["time/push_weights"],
            "snapshot_gb": snapshot_gb,
            "push_gb_per_s": snapshot_gb / mean["time/push_weights"],
            "load_gb_per_s": snapshot_gb / (sum(self.load_times) / len(self.load_times)) if self.load_times else None,
            "speedup_achieved": (G + T) / mean["time/step"],
            "speedup_ideal": (G + T) / max(G, T),
            "eval_gold_reward_start": self.eval_log[0]["eval/gold_reward"],
            "eval_gold_reward_end": self.eval_log[-1]["eval/gold_reward"],
            "kl_end": self.eval_log[-1]["eval/kl"],
            "lags": [m["async/lag"] for m in self.step_log],
        }
        if "eval/win_rate" in self.eval_log[-1]:  # with --reference_column
            summary["eval_win_rate_start"] = self.eval_log[0]["eval/win_rate"]
            summary["eval_win_rate_end"] = self.eval_log[-1]["eval/win_rate"]
        with open(os.path.join(self.dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        s = summary
        print(
            f"\ndone in {s['wall_time']:.1f}s (warm start {s['warm_start_time']:.1f}s). "
            f"Per step: {s['time_per_step']:.2f}s; "
            f"generating {G:.2f}s, training {T:.2f}s; trainer waited {s['trainer_wait_per_step']:.2f}s.\n"
            f"weights: {snapshot_gb:.3f} GB a snapshot, pushed at {s['push_gb_per_s']:.2f} GB/s, loaded into vLLM at "
            f"{s['load_gb_per_s'] or 0:.2f} GB/s.\noverlap speedup (G+T)/step: achieved {s['speedup_achieved']:.2f}x, "
            f"ideal (G+T)/max(G,T) {s['speedup_ideal']:.2f}x.\neval gold reward {s['eval_gold_reward_start']:.3f} -> "
            f"{s['eval_gold_reward_end']:.3f}, final KL {s['kl_end']:.2f}. Model and logs in {self.dir}"
        )
        if "eval_win_rate_end" in s:
            print(f"win rate against the references {s['eval_win_rate_start']:.3f} -> {s['eval_win_rate_end']:.3f}.")


def gather_shares(world: int, *shares: dict) -> list[dict]:
    """Each dict of tensors (or of lists of tensors, concatenated first) with every rank's share of each tensor
    concatenated in rank order, on every rank."""
    shares = [{name: torch.cat(v) if isinstance(v, list) else v for name, v in share.items()} for share in shares]
    gathered = [None] * world
    dist.all_gather_object(gathered, shares)
    return [{name: torch.cat([g[i][name] for g in gathered]) for name in share} for i, share in enumerate(shares)]


@dataclass
class StepTimes:
    """When the trainer began a step, had its batch, had trained on it, got the snapshot slot and had pushed."""

    began: float
    got_batch: float
    trained: float
    push_began: float
    pushed: float


def wandb_settings(args: Args, run_dir: str) -> dict:
    """A W&B run per run folder, whose id is the folder's name: --resume continues the same W&B run."""
    name = os.path.basename(run_dir)
    return dict(name=name, id=name, resume="allow", config=asdict(args), sync_tensorboard=True)


# What the generator reports it did in a batch's "spans", and the name of each in the metrics.
GENERATOR_SPANS = {"generate": "generate", "load": "load_weights", "wait": "wait_weights", "eval": "eval"}


# ----------------------------------------------------------------------------------------------------
# Checkpoints: the policy as a model folder, and trainer.pt with the optimizer, scheduler and RNG states, the
# batches sampled ahead, and where the logs stood.
def latest_checkpoint(run_dir: str):
    """The newest complete checkpoint: a half-written one still has its temporary name, so it is never picked."""
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")))
    return found[-1] if found else None


def read_checkpoint(checkpoint: str) -> dict:
    # Read to CPU memory wherever it was saved (GPU 1 of a bigger machine, say), and mapped, not copied.
    return torch.load(os.path.join(checkpoint, "trainer.pt"), map_location="cpu", weights_only=False, mmap=True)


def full_state_dict(args: Args, is_rank_0: bool, policy) -> dict:
    """The whole float32 policy on rank 0, to save, in CPU memory: a copy on the GPU would need room for all of it.
    Under FSDP every rank helps gather it, a weight at a time (torch's get_model_state_dict, cpu_offload)."""
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: w.detach().to("cpu", copy=True) for name, w in policy.state_dict().items()} if is_rank_0 else {}


def save_checkpoint(args: Args, is_rank_0: bool, version: int, policy, optimizer, scheduler, run, link):
    """Every rank helps gather the weights and optimizer state (under FSDP); rank 0 writes them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state_dict = full_state_dict(args, is_rank_0, policy)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optimizer_state = get_optimizer_state_dict(policy, optimizer, options=full) if args.fsdp else optimizer.state_dict()
    if not is_rank_0:
        return
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}
    state["rng"] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    # What older versions sample and evaluate, not yet logged: a resumed generator, which starts from this version,
    # could not make it again.
    sampled_before = sum(sampling_version(args, i) < version for i in range(version, args.num_steps))
    due = {v for v in range(version) if evaluated(args, v)} - {row["eval/version"] for row in run.eval_log}
    pending, pending_evals = link.ahead(sampled_before, due)
    state["pending"], state["pending_evals"] = [asdict(b) for b in pending], [asdict(e) for e in pending_evals]
    run.write_checkpoint(version, policy, state_dict, state)


def restore_checkpoint(args: Args, state: dict, policy, optimizer, scheduler) -> int:
    """Restore optimizer, scheduler and RNG from a checkpoint's trainer.pt; returns the policy version it holds (0 for
    a new run, whose state is empty). Each part is dropped once restored, so no second copy of the Adam state stays
    alive for the whole run."""
    if not state:
        return 0
    if args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(policy, optimizer, state.pop("optimizer"), options=full)
    else:
        optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = state.pop("rng")
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"])
    return state["version"]


def from_dict(cls, saved: dict):
    """A Batch or an Evaluation kept in a checkpoint as a dict, by any version of this file: fields since gone (an
    evaluation's KL once) are left out."""
    fields = {name: value for name, value in saved.items() if name in cls.__dataclass_fields__}
    if cls is Batch:
        fields["evals"] = [from_dict(Evaluation, e) for e in fields.get("evals", [])]
    return cls(**fields)


# ----------------------------------------------------------------------------------------------------
# Weights across processes: the policy packed into one flat tensor, which the generator reads as views, and
# the probe it checks them with once loaded.
def push_weights(args: Args, is_rank_0: bool, version: int, policy, batch: Batch, device, link) -> float:
    """Send the policy to the generator as one packed Snapshot, with a probe to check its load by, once the generator
    is done with the last one. Returns the time that wait ended."""
    if is_rank_0:
        link.wait_for_snapshot_slot()
    t_push = time.time()
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # vLLM's
    if args.fsdp or is_rank_0:  # under FSDP every rank holds a shard of the weights, so every rank helps gather them
        probe = make_probe(policy, batch, args.num_samples, device, args.bf16)
        packed = pack_weights(policy, dtype, snapshot_device(device), is_rank_0)  # None but on rank 0
    if is_rank_0:
        link.push(Snapshot(version, packed, probe))
    return t_push


def snapshot_weights(model) -> dict:
    """What vLLM needs: the floating-point state dict, a weight tied to another (lm_head to the embeddings)
    once, since vLLM ties it again on its side."""
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    return {name: w for name, w in model.state_dict().items() if w.is_floating_point() and name not in tied}


def snapshot_device(device):
    """Where rank 0 packs a snapshot: on GPUs, GPU 0, whose vLLM reads it there. Rank 0's own GPU is its fullest, and
    GPU 0 has room beside vLLM's share (plan_gpu_memory). Each weight crosses once, GPU to GPU."""
    return torch.device("cuda", 0) if device.type == "cuda" else device


def pack_weights(model, dtype, device, is_rank_0: bool):
    """The whole policy as one flat `dtype` tensor plus (name, shape, offset) per weight, on rank 0: one tensor
    crosses to the generator, not hundreds (one CUDA IPC handle, or one shared-memory file). Under FSDP2 each
    weight is cast, then gathered from the ranks' shards, one at a time, so every rank must call this; a full
    float32 copy never exists. Ranks other than 0 return None."""
    state_dict = snapshot_weights(model)
    layout, size = [], 0
    for name, w in state_dict.items():
        layout.append((name, tuple(w.shape), size))
        size += w.numel()
    # On a CPU, in shared memory from the start: the queue then sends it without copying it first.
    buffer = torch.empty(size, dtype=dtype, device=device).share_memory_() if is_rank_0 else None
    for (_, _, offset), w in zip(layout, state_dict.values()):
        w = w.detach().to(dtype)
        if hasattr(w, "full_tensor"):  # a DTensor: this rank's FSDP2 shard
            w = w.full_tensor()
        if is_rank_0:
            buffer[offset : offset + w.numel()] = w.flatten()
    return (buffer, layout) if is_rank_0 else None


def make_probe(policy, batch: Batch, k: int, device, bf16: bool) -> Probe:
    """The new policy's log-probs of the batch's longest completion, at temperature 1. Its last token is left out:
    vLLM needs room for one more in the context."""
    j = max(range(len(batch.response_ids)), key=lambda j: len(batch.response_ids[j]))
    prompt_ids, response_ids = batch.prompt_ids[j // k], batch.response_ids[j][:-1]
    ids, mask = (t.to(device) for t in pad_batch([prompt_ids], [response_ids]))
    width = len(response_ids)  # 0 when every completion was a lone EOS: nothing to probe
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logprobs = token_logprobs(policy, ids, mask, width, 1.0)[0].tolist() if width else []
    return Probe(prompt_ids, response_ids, logprobs)


def probe_gap(llm, probe: Probe) -> float:
    """Mean |log π_trainer - log π_vLLM| over the probe completion's tokens, vLLM's from the weights just loaded."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)  # 0: each prompt token's alone
    prompt = TokensPrompt(prompt_token_ids=probe.prompt_ids + probe.response_ids)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    logps = logprobs_of(probe.response_ids, output.prompt_logprobs[len(probe.prompt_ids) :])
    return sum(abs(a - b) for a, b in zip(logps, probe.logprobs)) / len(probe.response_ids)


def unpack_weights(buffer, layout) -> list:
    """(name, tensor) pairs that are views into the one buffer: nothing is copied."""
    return [(name, buffer[offset : offset + math.prod(shape)].view(shape)) for name, shape, offset in layout]


def logprobs_of(token_ids, positions) -> list[float]:
    """The log-prob of each token from vLLM's per-position dicts, which with logprobs=0 hold that token alone."""
    return [position[t].logprob for t, position in zip(token_ids, positions)]


# ----------------------------------------------------------------------------------------------------
# GPU memory, estimated before anything is loaded, from the models' configs and the flags: what each GPU of the
# generator's machine needs (docs/gpus.md, "Memory"), printed as a run starts, and vLLM's share of GPU 0.
GB = 1e9
CONTEXT_GB = 1.0  # a process's CUDA context, NCCL's buffers and the allocator's slack, on each GPU it uses
SHARED_GPU_VLLM_SHARE = 0.4  # vLLM's default share of a GPU the trainer shares
SHARED_GPU_SLACK = 0.05  # of that GPU, what vLLM takes beyond its share, and the two processes' CUDA contexts


@dataclass
class ModelShape:
    params: int  # every parameter, a tied one once
    block: int  # those of its largest transformer block: FSDP2 gathers a block, and the next, at a time
    root: int  # those outside the blocks (embeddings, head, last norm): FSDP2's root unit
    layers: int
    hidden: int
    vocab: int
    kv_per_token: int  # keys and values a token keeps in vLLM's cache, over all layers


def model_shape(path: str, model_class=AutoModelForCausalLM) -> ModelShape:
    """A model's shape from its config alone: it is built on the meta device, which holds no weights."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = model_class.from_config(config)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    blocks = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    block = max(map(count, blocks), default=0)  # none: shard() wraps the whole model as one unit
    root = count(model) - sum(map(count, blocks))
    layers = text.num_hidden_layers
    return ModelShape(
        count(model), block, root, layers, text.hidden_size, text.vocab_size, 2 * layers * kv_heads * head_dim
    )


def memory_needs(args: Args, shapes: dict, longest: int, gpus: int, gpu_gb: float) -> dict[str, dict[str, float]]:
    """GB by item on each GPU of the generator's machine (gpus of gpu_gb each), for the models' shapes ("policy",
    "reward", "gold": None where there is no such model) and the longest prompt plus response, in tokens. The rule,
    item by item, is docs/gpus.md's "Memory"."""
    policy, reward, gold = shapes["policy"], shapes.get("reward"), shapes.get("gold")
    dtype_bytes = 2 if args.bf16 else 4  # vLLM's, the reference's and the reward models' dtype, and autocast's
    share = args.trainer_ranks if args.fsdp else 1  # FSDP2 keeps 1/R of a model on each rank
    rows = args.micro_batch_size * (2 if args.loss_type in ("sigmoid", "ipo") else 1)  # sequences in a micro-batch
    logits = rows * (args.response_length + 1) * policy.vocab
    # Activations kept for the backward pass, per token of a sequence: about 24 values of the width in each layer of
    # a Llama block (its two norms, attention's inputs and outputs, the SwiGLU MLP's four at 3.5 times the width; a
    # GPT block keeps fewer). With checkpointing, a layer keeps its input, and one layer is recomputed at a time. Under
    # autocast the residual stream, and so a layer's input, stays float32 unless FSDP2 gathers bfloat16 weights.
    residual_bytes = 2 if args.bf16 and args.fsdp else 4
    per_token = rows * longest * policy.hidden
    if args.gradient_checkpointing:
        activations = per_token * (policy.layers * residual_bytes + 24 * dtype_bytes)
    else:
        activations = per_token * policy.layers * 24 * dtype_bytes
    rank = {
        "policy, gradients and Adam (float32)": 16 * policy.params / share,
        "autocast's bfloat16 weights": 2 * policy.params if args.bf16 and not args.fsdp else 0,
        "reference": policy.params * dtype_bytes / share,
        "reward model": reward.params * dtype_bytes if reward else 0,
        "logits and their gradient": 2 * logits * dtype_bytes + 3 * 4 * logits / rows,  # + one row's float32 work
        "activations": activations,
        "FSDP2's gathered root and blocks": 2 * (policy.root + 2 * policy.block) * dtype_bytes if args.fsdp else 0,
        "CUDA context": CONTEXT_GB * GB,
    }
    rank_0 = rank | {"gold reward model": gold.params * dtype_bytes if gold else 0}
    vllm_share = vllm_gpu_share(args, policy, gpus, gpu_gb)
    generator = {
        f"vLLM's share ({vllm_share:.2f} of the GPU)": vllm_share * gpu_gb * GB,
        # beyond its share, vLLM builds a layer anew to reload it, and scores the probe 1024 tokens at a time
        "vLLM beyond its share": policy.block * dtype_bytes + 1024 * policy.vocab * 4,
        "weight snapshot": policy.params * dtype_bytes,
    }
    if gpus == 1:
        needs = {"GPU 0": generator | rank_0}
    else:
        needs = {"GPU 0": generator | {"rank 0's CUDA context": CONTEXT_GB * GB}, "GPU 1": rank_0}
        needs |= {f"GPU {g}": rank for g in range(2, min(gpus, args.trainer_ranks + 1))}
    return {gpu: {item: b / GB for item, b in items.items() if b} for gpu, items in needs.items()}


def vllm_gpu_share(args: Args, policy: ModelShape, gpus: int, gpu_gb: float) -> float:
    """--vllm_gpu_memory_utilization, or its default: 0.4 of a GPU the trainer shares, else 0.9 less the weight
    snapshot that rank 0 packs on GPU 0 (snapshot_device), rank 0's CUDA context there and vLLM's needs beyond its
    share (about as much again). At least 0.1: a GPU with less room fails the check in memory_report."""
    if args.vllm_gpu_memory_utilization is not None:
        return args.vllm_gpu_memory_utilization
    snapshot_gb = policy.params * (2 if args.bf16 else 4) / GB
    return SHARED_GPU_VLLM_SHARE if gpus == 1 else max(0.1, round(0.9 - (snapshot_gb + 2 * CONTEXT_GB) / gpu_gb, 2))


def vllm_share_of_gpu_0(args: Args, policy_path: str) -> float:
    """vLLM's share of GPU 0, resolved as a run starts (a resumed run may be on other GPUs): vllm_gpu_share."""
    if not torch.cuda.is_available():  # vLLM sizes its cache by --vllm_cpu_kv_cache_gib on a CPU
        return args.vllm_gpu_memory_utilization or SHARED_GPU_VLLM_SHARE
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GB
    return vllm_gpu_share(args, model_shape(policy_path), torch.cuda.device_count(), gpu_gb)


def plan_gpu_memory(args: Args, starting_point: StartingPoint, longest: int):
    """On GPUs: print what each GPU of this machine needs, and warn in one sentence for each that has too little."""
    if not torch.cuda.is_available():
        return
    shapes = {"policy": model_shape(starting_point.policy_path)}
    for key, path in [("reward", args.reward_model_path), ("gold", args.gold_reward_model_path)]:
        shapes[key] = model_shape(path, AutoModelForSequenceClassification) if path else None
    gpus, gpu_gb = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / GB
    needs = memory_needs(args, shapes, longest, gpus, gpu_gb)
    lines, warnings = memory_report(args, needs, shapes, longest, gpus, gpu_gb)
    print("\n".join(lines))
    for warning in warnings:
        print(warning, file=sys.stderr)


def memory_report(args: Args, needs: dict, shapes: dict, longest: int, gpus: int, gpu_gb: float) -> tuple[list, list]:
    """The estimate as printed, a line a GPU, and a one-sentence warning for each GPU that may need more than it has;
    for vLLM's share, if it cannot hold vLLM's weights and one sequence's keys and values; on one GPU, if the trainer
    needs more than the rest (join_trainer_ranks caps it there)."""
    lines, warnings = [f"memory, estimated (docs/gpus.md, Memory), in GB of the {gpu_gb:.1f} of each GPU here:"], []
    unset = [
        flag
        for flag, on in [("--gradient_checkpointing", args.gradient_checkpointing), ("--bf16", args.bf16)]
        if not on
    ]
    unset += ["more ranks under --fsdp" if args.fsdp else "--fsdp over several ranks"] if gpus > 1 else []
    advice = "lower --micro_batch_size" + (f", or use {', '.join(unset)}" if unset else "")
    for gpu, items in needs.items():
        total = sum(items.values())
        lines.append(f"  {gpu}: {total:.1f}: " + ", ".join(f"{item} {gb:.1f}" for item, gb in items.items()))
        if total > gpu_gb:
            fix = "lower --vllm_gpu_memory_utilization" if gpu == "GPU 0" and gpus > 1 else advice
            warnings.append(
                f"warning: {gpu} may need {total:.0f} GB, more than its {gpu_gb:.0f}: {fix} (docs/gpus.md)."
            )
    policy, dtype_bytes = shapes["policy"], 2 if args.bf16 else 4
    vllm_gb = vllm_gpu_share(args, policy, gpus, gpu_gb) * gpu_gb
    vllm_needs = (policy.params + policy.kv_per_token * longest) * dtype_bytes / GB
    if vllm_gb < vllm_needs:
        warnings.append(
            f"warning: vLLM's share of GPU 0, {vllm_gb:.0f} GB, cannot hold its weights and one sequence's keys and "
            f"values ({vllm_needs:.0f} GB): raise --vllm_gpu_memory_utilization, or use --bf16 (docs/gpus.md)."
        )
    if gpus == 1:
        trainer = sum(gb for item, gb in needs["GPU 0"].items() if not item.startswith("vLLM")) - CONTEXT_GB
        cap = (1 - vllm_gb / gpu_gb - SHARED_GPU_SLACK) * gpu_gb
        if trainer > cap:
            warnings.append(
                f"warning: the trainer may need {trainer:.0f} GB of GPU 0, more than the {cap:.0f} that vLLM's share "
                f"leaves it: lower --vllm_gpu_memory_utilization, or {advice} (docs/gpus.md)."
            )
    return lines, warnings


# ----------------------------------------------------------------------------------------------------
# Process plumbing: CPU cores, the generator's process and its end of the queues, the trainer ranks, and
# stopping all of them cleanly whatever happens.
def pin_to_cores(cores: list[int]):
    """Run this process on these CPU cores only (Linux; elsewhere the thread count alone separates them)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def split_cpu_cores(share: bool = False):
    """On a CPU the generator takes the first half of our cores and the trainer the rest (or both take all). On a
    machine without the generator (torchrun's nodes 1, 2, ...) the trainer ranks have every core."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if share or not on_generator_node():
        return cores, cores
    half = max(1, len(cores) // 2)
    return cores[:half], cores[half:] or cores


# Set once: whether torchrun (or torch's launcher, for --trainer_ranks) started this process as one of the ranks.
UNDER_TORCHRUN = "WORLD_SIZE" in os.environ


@dataclass
class Ready:  # the generator's first message: vLLM is up and has sized its KV cache
    pass


@dataclass
class GeneratorFailed:  # the generator's last message if it crashed
    traceback: str


class Stopped(Exception):
    """Raised in the generator when the trainer has finished, failed or been killed."""


class GeneratorError(RuntimeError):
    """The generator process crashed (its traceback is in the message) or died."""


class WeightSyncError(RuntimeError):
    """vLLM's log-probs disagree with the trainer's where they should not: vLLM is not serving the pushed weights."""

    def __init__(self, gap: float, tolerance: float, version: int, probe: bool, async_scheduling: bool = False):
        what = f"after loading policy version {version}, vLLM's log-probs of the probe completion"
        if not probe:
            what = f"batch {version} was sampled by policy version {version}, the very weights the trainer holds, yet "
            what += "vLLM's log-probs of its tokens"
        # vLLM's async scheduling is on by default on GPUs, and no CPU runs it (docs/gpus.md): the first suspect.
        first = "; try --no_vllm_async_scheduling first" if async_scheduling else ""
        super().__init__(
            f"the weight sync is broken: {what} differ from the trainer's by {gap:.3g} per token on average, more "
            f"than --logprob_gap_tolerance {tolerance:g}; vLLM is not serving the pushed weights{first}."
        )


def set_up_generator_process(args: Args, cpu_cores: list[int]):
    """vLLM's settings, made before it is imported."""
    # With the engine inside this process, collective_rpc can pass tensors (vLLM 0.32).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM forms a process group of one in here. Under torchrun this variable says that torchrun's agent hosts every
    # store, so torch only connects to one (torch/distributed/rendezvous.py, _create_c10d_store): a vLLM that meets at
    # a tcp:// address of its own (0.24's UniProcExecutor; 0.32's uses a file) would wait forever. We are no rank.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ["VLLM_CACHE_ROOT"] = os.path.abspath(os.path.join(args.cache_dir, "vllm"))
    # vLLM 0.32 warns on every reload that RotaryEmbedding has no weights (its tables are computed, not
    # loaded); that would bury the step lines. Set VLLM_LOGGING_LEVEL=INFO to see everything.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=".*reduce_op.*", category=FutureWarning)
    # In float32 on GPUs vLLM's attention is a Triton kernel, whose float32 products default to TF32 (10-bit
    # mantissa); full precision keeps vLLM's log-probs those of the trainer, as the weight-sync check expects.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    if not torch.cuda.is_available():
        # The CPU install leaves out Triton, a GPU compiler the CPU backend never uses: torch need not warn about it.
        logging.getLogger("torch._library.triton").setLevel(logging.ERROR)
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.vllm_cpu_kv_cache_gib)
        os.environ["OMP_NUM_THREADS"] = str(len(cpu_cores))
        pin_to_cores(cpu_cores)  # our own cores, so the trainer never slows us down
    from vllm import LLM  # noqa: F401  (all of vLLM's modules, which read the settings above as they are imported)

    # Everything made so far (torch's, transformers' and vLLM's modules) lives as long as this process. vLLM collects
    # garbage several times while it starts; frozen, these objects are not walked each time (a second or more).
    gc.freeze()


def new_queues() -> Queues:
    ctx = mp.get_context("spawn")
    return Queues(samples=ctx.Queue(), weights=ctx.Queue(), snapshot_free=ctx.Semaphore(1), stop=ctx.Event())


def start_generator(args: Args, queues: Queues, starting_point: StartingPoint, prompts, max_model_len: int):
    """Spawn the generator process with its queues: from the checkpoint's version when resuming, and past the batches
    that checkpoint kept (sampled before it, not yet trained on). On one GPU, wait until vLLM is up: it sizes its KV
    cache from the memory free as it starts, so the trainer must allocate nothing before."""
    state = starting_point.state
    version, pending = state.get("version", 0), [from_dict(Batch, b) for b in state.get("pending", [])]
    settings = (args, queues, starting_point.policy_path, version, version + len(pending), prompts, max_model_len)
    cores = split_cpu_cores(args.cpu_share_cores)[0]
    process = mp.get_context("spawn").Process(target=generator_process, args=(cores, *settings), daemon=True)
    process.start()
    link = GeneratorLink(process, queues, pending, [from_dict(Evaluation, e) for e in state.get("pending_evals", [])])
    if torch.cuda.device_count() == 1:
        link.wait_until_ready()
    return link


def generator_process(cpu_cores: list[int], args: Args, queues: Queues, *settings):
    """The generator process runs this: vLLM's settings, made before it is imported, and on a CPU our own cores;
    then `generator`, with its crash's traceback handed to the trainer. It ends without Python's teardown of vLLM
    and torch (exit_now), two to three seconds that nobody needs."""
    try:
        set_up_generator_process(args, cpu_cores)
        generator(args, queues, *settings)
        queues.samples.close()
        queues.samples.join_thread()  # every message has reached the pipe, Done last
        exit_now(0)
    except (KeyboardInterrupt, Stopped):
        queues.samples.cancel_join_thread()  # Ctrl-C or the trainer stopped: exit without flushing
        exit_now(0)
    except BaseException:
        queues.samples.put(GeneratorFailed(traceback.format_exc()))  # the trainer re-raises it with this traceback
        sys.exit(1)


def stop_if_trainer_stopped(stop):
    if stop.is_set() or not mp.parent_process().is_alive():  # done, failed, or killed outright
        raise Stopped


def next_snapshot(queues: Queues, spans: list) -> Snapshot:
    """The next snapshot the trainer pushed, waited for while the trainer lives; the wait goes into spans."""
    t = time.time()
    while True:
        try:
            snapshot = queues.weights.get(timeout=1)
            spans.append(("wait", t, time.time()))
            return snapshot
        except queue.Empty:
            stop_if_trainer_stopped(queues.stop)


def receive(samples_queue, process):
    """Next message from the generator; a crash there becomes a GeneratorError here within seconds."""
    while True:
        try:
            message = samples_queue.get(timeout=1)
        except queue.Empty:
            if process.is_alive():
                continue
            raise generator_failure(samples_queue, process) from None
        if isinstance(message, GeneratorFailed):
            raise GeneratorError("the generator process crashed:\n" + message.traceback)
        return message


def generator_failure(samples_queue, process) -> GeneratorError:
    """The generator has died: the error to raise, with its traceback if it put one on the queue."""
    try:
        while not isinstance(message := samples_queue.get(timeout=1), GeneratorFailed):
            pass  # batches it sent before it died
    except queue.Empty:
        return GeneratorError(f"the generator process died (exit code {process.exitcode}) without a traceback")
    return GeneratorError("the generator process crashed:\n" + message.traceback)


def wait_for_snapshot_slot(snapshot_free, samples_queue, process) -> float:
    """Wait until the generator is done with the last snapshot; returns the seconds waited."""
    t = time.time()
    while not snapshot_free.acquire(timeout=1):
        if not process.is_alive():
            raise generator_failure(samples_queue, process)
    return time.time() - t


class GeneratorLink:
    """Rank 0's end of the generator's queues (see the generator), and the generator process itself."""

    def __init__(self, process, queues: Queues, pending: list, evals: list):
        self.process = process
        self.queues = queues
        self.ready = False  # whether vLLM is up: the generator's first message says so
        self.pending = deque(pending)  # batches received, or restored from a checkpoint, not yet trained on
        self.evals = list(evals)  # evaluations received, or restored, not yet logged: they go with the next batch
        self.snapshot = None  # the last snapshot pushed; its sender must keep a CUDA tensor alive while it is used
        self.snapshot_gb = 0.0

    def receive(self):
        return receive(self.queues.samples, self.process)

    def wait_until_ready(self):
        """Wait for the generator's first message, Ready, unless it has come."""
        if not self.ready:
            message = self.receive()
            if not isinstance(message, Ready):
                raise GeneratorError(f"the generator's first message was not Ready but {type(message).__name__}")
            self.ready = True

    def read(self) -> "Batch | Done | None":
        """The next message after Ready; None for an evaluation, which is kept for the next batch."""
        self.wait_until_ready()
        message = self.receive()
        if isinstance(message, Evaluation):
            self.evals.append(message)
            return None
        return message

    def next_batch(self) -> Batch:
        """The next batch to train on, with the evaluations received before it (an older run's batch has its own).
        Not before vLLM is up, even for a batch a checkpoint kept: vLLM loads the policy from the checkpoint's folder
        as it starts, and the next save deletes that folder."""
        self.wait_until_ready()
        batch = self.pending.popleft() if self.pending else None
        while batch is None:
            batch = self.read()
        batch.evals, self.evals = batch.evals + self.evals, []
        return batch

    def ahead(self, n: int, due: set) -> tuple[list, list]:
        """For a checkpoint: the next n batches and the evaluations of the versions in `due`, received now if need be
        (the generator makes them without waiting for the trainer); next_batch returns them still. The generator sends
        both before anything from a newer version, so no batch that a resumed generator samples again is kept."""
        while len(self.pending) < n or due - {e.version for e in self.evals}:
            message = self.read()
            if message is not None:
                self.pending.append(message)
        return list(self.pending), [e for e in self.evals if e.version in due]

    def finish(self) -> Done:
        """The generator's last message, with the evaluations still to log (the final policy's among them)."""
        message = None
        while message is None:
            message = self.read()
        message.evals, self.evals = self.evals, []
        return message

    def wait_for_snapshot_slot(self):
        wait_for_snapshot_slot(self.queues.snapshot_free, self.queues.samples, self.process)
        self.snapshot = None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # give back the memory of the snapshot the generator let go of

    def push(self, snapshot: Snapshot):
        self.snapshot = snapshot
        buffer = snapshot.packed[0]
        self.snapshot_gb = buffer.numel() * buffer.itemsize / 1e9
        self.queues.weights.put(snapshot)

    def close(self):
        """Stop the generator, however the run ended."""
        self.queues.stop.set()
        self.queues.weights.cancel_join_thread()  # don't block exit on snapshots the generator never read
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


def from_a_collective(error: BaseException) -> bool:
    """Whether the error is a collective's: it timed out, or a rank it waits for is gone. Inside DDP's backward pass
    gloo raises a plain RuntimeError, which names gloo."""
    if not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistError) or any(word in str(error) for word in ("gloo", "NCCL"))


def reason_to_stop(args: Args, rank: int, error: BaseException) -> str:
    """What stopped a rank, in one sentence (empty for the ranks but 0 where every rank meets the same check, so rank 0
    alone says it); anything else is a bug, given with its traceback."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM: `kill`, or torchrun stopping the ranks
        return "interrupted: stopped the trainer and the generator" if rank == 0 else ""
    if isinstance(error, (GeneratorError, WeightSyncError)):
        return f"error: {error}" if rank == 0 else ""
    if from_a_collective(error):
        what = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return (
            f"error: trainer rank {rank}: a rank failed, or this one waited longer than --dist_timeout "
            f"{args.dist_timeout}s for the others in a collective ({what})"
        )
    return "".join(traceback.format_exception(error)).rstrip()


@contextmanager
def rank_lifetime(args: Args, rank: int):
    """Around a trainer rank: `kill` (or torchrun stopping the ranks) acts as Ctrl-C; whatever stops the rank becomes
    one sentence (reason_to_stop); and what was handed to close_at_exit (the generator, the run folder) is closed,
    however it ended. Only a rank that ends cleanly leaves the process group: see shut_down."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    opened, stopping = [], threading.Event()
    stop_when_stuck(opened, rank, stopping)

    def close_at_exit(thing):
        opened.append(thing)
        return thing

    try:
        yield close_at_exit
    except SystemExit:  # bad input found on the way (check_lengths), before any collective: its sentence is the exit's
        stopping.set()
        shut_down(opened)
        raise
    except BaseException as error:  # Ctrl-C, a generator crash, a broken weight sync, a lost rank, a bug
        stopping.set()
        reason = reason_to_stop(args, rank, error)
        shut_down(opened)
        if reason:
            print(reason, file=sys.stderr)
        exit_now(1)  # the run is over: without leaving the process group (see shut_down), and at once
    if dist.is_initialized():  # every rank ends here together; a signal still stops a rank that waits in it
        dist.destroy_process_group()
    stopping.set()
    shut_down(opened)


def exit_now(code: int):
    """End this process at once, with what multiprocessing does on a process's way out (its semaphores freed) but
    without Python's teardown of every module."""
    sys.stdout.flush()
    sys.stderr.flush()
    multiprocessing.util._exit_function()
    os._exit(code)


CLOSING = threading.Lock()  # shut_down's: the main thread and stop_when_stuck's may both call it


def shut_down(opened: list):
    """However the run ended: close what was opened, newest first; a second call does nothing. Signals wait until
    this is done (the generator is joined for at most 10 s), so a second Ctrl-C cannot cut it short.

    It does not leave the process group. Under NCCL, destroy_process_group() runs ncclCommFinalize, which waits for
    this rank's own NCCL kernels (torch ProcessGroupNCCL::shutdown), and NCCL documents ncclCommDestroy as a
    collective of the node's ranks. A rank that failed while its peers wait elsewhere would wait there until the
    watchdog's --dist_timeout. gloo's returns at once, which is why only the clean path, where every rank ends
    together, leaves the group (rank_lifetime)."""
    if threading.current_thread() is threading.main_thread():  # signal.signal works there alone
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with CLOSING:
        while opened:
            opened.pop().close()


STUCK_SECONDS = 5  # how long a signal may wait for the main thread before stop_when_stuck acts on it


def stop_when_stuck(opened: list, rank: int, stopping: threading.Event):
    """Make Ctrl-C and torchrun's SIGTERM work while the main thread is blocked in torch's C++: a Python signal
    handler runs only once the main thread runs Python again, and under NCCL a rank can wait for good in a
    collective whose peer is gone, or on the GPU behind one. CPython's C handler writes each signal's number to the
    wakeup fd at once (Modules/signalmodule.c, trip_signal); a thread woken by it shuts the run down and exits, unless
    the main thread has begun to stop within STUCK_SECONDS."""
    woken, wakeup = os.pipe()
    os.set_blocking(wakeup, False)
    signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)

    def watch():
        while os.read(woken, 1)[0] not in (signal.SIGINT, signal.SIGTERM):  # any signal with a Python handler writes
            pass
        if stopping.wait(STUCK_SECONDS):
            return
        if rank == 0:
            print("interrupted while waiting in torch: stopped the trainer and the generator", file=sys.stderr)
        shut_down(opened)
        exit_now(1)

    threading.Thread(target=watch, daemon=True).start()


def launch_ranks(args: Args):
    """--trainer_ranks R: this script again as R ranks on this machine, by torch's launcher (what `torchrun
    --standalone --nproc_per_node R` runs), which sets each rank's RANK and WORLD_SIZE, meets them on a free port,
    and stops them all if one fails. The warm start is built here first, so that the ranks find it."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the sentence below says it all
    if not args.model_name_or_path:
        warm_start(args)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=args.trainer_ranks,
        run_id=f"{os.getpid()}-{time.time_ns()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        shutdown_timeout=15,  # after Ctrl-C, seconds a rank has to stop before it is killed (30 after a failure)
    )
    try:
        elastic_launch(config, sys.executable)(*sys.argv)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        fail(
            f"trainer rank {rank} stopped with exit code {failure.exitcode} (its reason, if it gave one, is above); "
            "torch's launcher stopped the other ranks and, with rank 0, the generator."
        )
    except (KeyboardInterrupt, SignalException):
        sys.exit("interrupted: stopped the trainer ranks and the generator")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
    exit_now(0)  # everything is closed and saved: Python's teardown of torch and transformers would take a second
