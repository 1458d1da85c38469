"""Asynchronous online DPO with a vLLM generator in its own process.

Reference implementation of "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language
Models" (Noukhovitch et al., ICLR 2025, arXiv 2410.18252). A vLLM generator samples completions with a
policy exactly N updates old while the trainer learns from earlier batches with online DPO, so generation
and training overlap. `sync_baseline.py` runs the same code with N = 0 for comparison.

    python async_online_dpo.py                      # CPU: generator and trainer on separate cores (~4 min)
    python async_online_dpo.py                      # 1 GPU: both share GPU 0 (--vllm_gpu_memory_utilization)
    CUDA_VISIBLE_DEVICES=0,1 python async_online_dpo.py   # 2 GPUs: generator on GPU 0, trainer on GPU 1
    python async_online_dpo.py --trainer_ranks 4 --fsdp --bf16   # 5 GPUs: generator + 4 FSDP2 trainer ranks
    python async_online_dpo.py --async_steps 4      # let the generator run 4 batches ahead
    python async_online_dpo.py --model_name_or_path PATH --dataset data.jsonl --reward_model_path RM
    python async_online_dpo.py --save_every 16      # then, after a crash: --resume runs/RUN_FOLDER
    python sync_baseline.py                         # the same run, generation and training in turn

See README.md for the GPU recipes (Pythia on TL;DR, Llama 3.1 8B) and what every logged metric means.
"""

import glob
import importlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import tyro
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)  # fmt: skip
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


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

    # --- online DPO
    num_steps: int = 128
    """policy updates; each consumes one batch of --batch_size prompts"""
    batch_size: int = 64
    """prompts per batch, across all trainer ranks (the paper uses 512 on TL;DR)"""
    num_samples: int = 2
    """k, completions sampled per prompt; chosen = best score, rejected = worst"""
    response_length: int = 16
    """most tokens sampled per completion (the paper uses 53 on TL;DR)"""
    temperature: float = 0.7
    """sampling temperature; policy and reference logits are divided by it too, as in the paper's code"""
    missing_eos_penalty: float = -1.0
    """score given to a completion that never emits EOS (the paper uses -1 on TL;DR)"""
    beta: float = 0.1
    """β in the DPO loss, the strength of the pull towards the reference"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: the DPO loss; ipo: the IPO loss (logits - 1/(2β))²"""
    learning_rate: float = 1e-4
    """AdamW learning rate, decayed linearly to 0 over --num_steps"""
    micro_batch_size: int = 32
    """(chosen, rejected) pairs per forward/backward on each rank; gradients accumulate to one update"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # --- asynchrony
    async_steps: int = 1
    """N: batch i is sampled by policy version max(0, i - N); 0 is synchronous (sync_baseline.py)"""

    # --- evaluation
    eval_every: int = 16
    """evaluate the policy versions that are multiples of this, and the first and last"""
    eval_prompts: int = 256
    """held-out prompts per evaluation, sampled greedily (a dataset's last rows of --dataset_split)"""

    # --- checkpoints
    save_every: int = 0
    """save a checkpoint every this many updates (0 = never); only the newest is kept"""
    resume: str = ""
    """run folder to continue from its newest checkpoint, with the flags it was started with"""

    # --- hardware
    trainer_ranks: int = 1
    """R, data-parallel trainer processes: on GPUs 1..R (GPU 0 is the generator's), or on CPU cores"""
    fsdp: bool = False
    """shard weights, gradients and Adam state over the ranks with FSDP2 (when they don't fit one GPU)"""
    bf16: bool = False
    """train under bfloat16 autocast (weights and Adam state stay float32) and run vLLM in bfloat16"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    vllm_gpu_memory_utilization: float = 0.4
    """share of GPU 0's memory vLLM reserves; keep it low when the trainer shares GPU 0"""
    vllm_cpu_kv_cache_gib: int = 1
    """GiB of RAM vLLM reserves for its KV cache on a CPU (vLLM's own default takes most of the RAM)"""
    cpu_share_cores: bool = False
    """on a CPU, give generator and trainer every core, not half each: for sync runs, where they take turns"""

    # --- testing
    crash_generator_at: int = -1
    """raise an error inside the generator at this batch (-1: never), to test that a crash stops the run"""


# ----------------------------------------------------------------------------------------------------
# The built-in task: sort the letters. Prompt "dbca=", answer "abcd" then EOS. The gold reward gives
# partial credit, 1 - (edit distance to the sorted letters) / (length of the longer string), in [0, 1]:
# each letter missing, extra or wrong costs about the same, so a near miss scores close to a hit.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_LETTERS, MAX_LETTERS = 4, 12


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


# ----------------------------------------------------------------------------------------------------
# Prompts and rewards from elsewhere: a dataset loaded with `datasets`, a reward function or a reward model.
def load_split(args: Args, split: str, streaming: bool = False):
    from datasets import load_dataset

    if os.path.isfile(args.dataset):
        return load_dataset("json", data_files=args.dataset, split=split, streaming=streaming)
    return load_dataset(args.dataset, split=split, streaming=streaming)


def load_prompts(args: Args):
    """Training prompts (None for the built-in task: drawn per batch), eval prompts, and their references."""
    if not args.dataset:
        return None, builtin_prompts(random.Random("eval"), args.eval_prompts), None
    rows = load_split(args, args.dataset_split)
    cut = max(0, len(rows) - args.eval_prompts)  # the last rows are held out for evaluation
    train, held_out = rows.select(range(cut)), rows.select(range(cut, len(rows)))
    references = list(held_out[args.reference_column]) if args.reference_column else None
    return list(train[args.prompt_column]), list(held_out[args.prompt_column]), references


def batch_prompts(args: Args, train_prompts, index: int) -> list[str]:
    """The prompts of batch `index`, a function of seed and index alone: a resumed run sees the same data."""
    if train_prompts is None:
        return builtin_prompts(random.Random(f"train-{args.seed}-{index}"), args.batch_size)
    order = random.Random(args.seed).sample(range(len(train_prompts)), len(train_prompts))  # one shuffle, cycled
    return [train_prompts[order[i % len(order)]] for i in range(index * args.batch_size, (index + 1) * args.batch_size)]


def load_reward(args: Args, model_path: str, device):
    """(prompts, completions) -> one float each: a reward model if given, else --reward_fn or the built-in reward."""
    if not model_path:
        if not args.reward_fn:
            return builtin_reward
        module, _, name = args.reward_fn.partition(":")
        sys.path.insert(0, os.getcwd())
        return getattr(importlib.import_module(module), name)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=dtype).to(device).eval()
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def reward_model(prompts, completions):
        # The policy's tokens arrive as text, tokenized again by the reward model's tokenizer: any vocabulary works.
        texts, scores = [p + c for p, c in zip(prompts, completions)], []
        for start in range(0, len(texts), args.micro_batch_size):
            inputs = tokenizer(texts[start : start + args.micro_batch_size], padding=True, return_tensors="pt")
            scores += model(**inputs.to(device)).logits[:, 0].float().tolist()
        return scores

    return reward_model


# ----------------------------------------------------------------------------------------------------
# The math: log-probs, scores, pairs and the DPO loss. Pure functions, checked in tests/.
def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature):
    """Sum over response tokens of log π(y_t | x, y_<t), with logits divided by the sampling temperature."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    logps = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_logps = torch.gather(logps, 2, input_ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    return (token_logps * response_mask[:, 1:]).sum(1)  # (B,)


def apply_missing_eos_penalty(rewards, has_eos, penalty):
    """A completion cut off before EOS gets a fixed score, whatever the reward said (paper, sec. 2)."""
    return torch.where(has_eos, rewards, torch.full_like(rewards, penalty))


def select_pairs(scores):
    """Chosen = highest score, rejected = lowest, per prompt. scores: (P, k).

    When all k scores are equal the pair says nothing about which completion is better, so it is
    marked invalid and left out of the loss (and counted in rewards/tie_frac)."""
    chosen, rejected = scores.argmax(1), scores.argmin(1)  # (P,)
    valid = scores.max(1).values > scores.min(1).values
    return chosen, rejected, valid


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="sigmoid"):
    """Per-pair loss. DPO (Rafailov et al. 2023, eq. 7):
        -log σ(β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])
    IPO (Azar et al. 2023, eq. 17) regresses the same log-ratio difference to 1/(2β)."""
    logits = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return -F.logsigmoid(beta * logits)


def pad_right(sequences: list[list[int]], pad_id: int):
    """Token lists -> (B, T) ids and attention mask, padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    mask = torch.arange(width)[None, :] < torch.tensor([len(s) for s in sequences])[:, None]
    return ids, mask.long()


def mask_prompts(attention_mask, prompt_lengths: list[int]):
    """(B, T) mask that is 1 on response tokens only: 0 on each row's prompt and on padding."""
    positions = torch.arange(attention_mask.shape[1])[None, :]
    return attention_mask * (positions >= torch.tensor(prompt_lengths)[:, None])


# ----------------------------------------------------------------------------------------------------
# The warm start: with no --model_name_or_path we build a ~10 M parameter Llama and a character
# tokenizer here, and teach it the task briefly with supervised learning, to an imperfect SFT policy.
# save_pretrained makes it an ordinary model folder that vLLM and transformers both load.
def warm_start(args: Args) -> str:
    path = os.path.join(args.cache_dir, f"builtin-sort-sft{args.sft_steps}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    print(f"warm start: building the built-in model and training it for {args.sft_steps} SFT steps (once, then cached)")
    vocab = {"<pad>": 0, "</s>": 1} | {c: i + 2 for i, c in enumerate(LETTERS + "=")}
    char_level = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    char_level.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_level, pad_token="<pad>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)  # one SFT model shared by every seed, as in the paper
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / args.sft_steps)
    rng = random.Random("sft")
    for step in range(args.sft_steps):
        prompts = builtin_prompts(rng, 64)
        prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
        answer_ids = [tokenizer("".join(sorted(p[:-1])))["input_ids"] + [1] for p in prompts]
        input_ids, attention_mask = pad_right([p + a for p, a in zip(prompt_ids, answer_ids)], 0)
        labels = input_ids.masked_fill(mask_prompts(attention_mask, [len(p) for p in prompt_ids]) == 0, -100)  # answers only
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a half-written model folder is never picked up
    return path


# ----------------------------------------------------------------------------------------------------
# The generator process. It owns vLLM. Two queues and one stop signal connect it to the trainer:
#   weights_queue  trainer -> generator  {"version", "state_dict"}, one per update
#   samples_queue  generator -> trainer  one batch per step, tagged with the version that sampled it
#   stop           set by the trainer when it is done or has failed
#
# The only difference between async and sync is one rule: batch i is sampled by policy version
# max(0, i - N) (N = --async_steps). With N = 1 the generator samples batch i+1 while the trainer learns
# from batch i, one version behind:
#
#   generator | b0 (v0) | b1 (v0) | b2 (v1) | b3 (v2) | ...        b_i (v_j): batch i sampled by version j
#   trainer   |  wait   | train b0 | train b1 | train b2 | ...      training b_i makes version i+1
#                                 ^ push v1  ^ push v2
#
# With N = 0 the generator waits for version i before batch i, and the trainer waits while it samples.
# The version is exact, not "at least": with per-prompt sampling seeds, a run is then reproducible, and
# a resumed run samples what the uninterrupted one would have.
def pin_to_cores(cores: list[int]):
    """Run this process on these CPU cores only (Linux; elsewhere the thread count alone separates them)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))


def split_cpu_cores(share: bool = False):
    """On a CPU the generator takes the first half of our cores and the trainer the rest (or both take all)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if share:
        return cores, cores
    half = max(1, len(cores) // 2)
    return cores[:half], cores[half:] or cores


def load_weights_into_vllm(llm, state_dict):
    """Every vLLM internal we touch, in one place. Written against vLLM 0.32.0 (V1 engine).

    reload_weights swaps the weights of the running engine in place (no restart, no disk): it takes
    transformers parameter names. The prefix cache holds keys and values computed by the old weights,
    so it must be dropped, or cached prompts would mix two policies."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
    llm.reset_prefix_cache()


class Stopped(Exception):
    """Raised in the generator when the trainer has finished, failed or been killed."""


def generator(args: Args, model_path: str, start_version: int, first_batch: int, max_model_len: int,
              cpu_cores: list[int], weights_queue, samples_queue, stop):  # fmt: skip
    """Sample batches first_batch, first_batch + 1, ... with vLLM, starting from the policy version
    saved at model_path (0 for a new run; a checkpoint's version when resuming)."""
    try:
        # With the engine inside this process, collective_rpc can pass tensors (vLLM 0.32).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CACHE_ROOT"] = os.path.abspath(os.path.join(args.cache_dir, "vllm"))
        # vLLM 0.32 warns on every reload that RotaryEmbedding has no weights (its tables are computed,
        # not loaded); that would bury the step lines. Set VLLM_LOGGING_LEVEL=INFO to see everything.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        warnings.filterwarnings("ignore", message=".*reduce_op.*", category=FutureWarning)
        if not torch.cuda.is_available():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.vllm_cpu_kv_cache_gib)
            os.environ["OMP_NUM_THREADS"] = str(len(cpu_cores))
            pin_to_cores(cpu_cores)  # our own cores, so the trainer never slows us down
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=model_path, dtype="bfloat16" if args.bf16 else "float32", seed=args.seed,
            max_model_len=max_model_len, enforce_eager=True, enable_prefix_caching=False,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        )  # fmt: skip
        train_prompts, eval_prompts, _ = load_prompts(args)
        version = start_version
        due = lambda v: v % args.eval_every == 0 or v == args.num_steps  # noqa: E731, versions to evaluate

        def check_trainer():
            if stop.is_set() or not mp.parent_process().is_alive():  # done, failed, or killed outright
                raise Stopped

        def generate(prompts, temperature, n, seed):
            # One seed per prompt: what a prompt samples depends only on the weights and its seed.
            params = [SamplingParams(n=n, temperature=temperature, max_tokens=args.response_length, seed=seed + j)
                      for j in range(len(prompts))]  # fmt: skip
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return [o.prompt_token_ids for o in outputs], [list(c.token_ids) for o in outputs for c in o.outputs]

        def evaluate(spans, evals):
            t = time.time()
            _, response_ids = generate(eval_prompts, 0.0, 1, seed=10**12 + version * len(eval_prompts))
            evals.append({"version": version, "prompts": eval_prompts, "response_ids": response_ids})
            spans.append(("eval", t, time.time()))

        def take_weights(target, spans, evals):
            """Read snapshots in order up to policy version `target` and load it. Versions due for
            evaluation are loaded and evaluated on the way, so none is skipped."""
            nonlocal version
            while version < target:
                t = time.time()
                while True:
                    try:
                        snapshot = weights_queue.get(timeout=1)
                        break
                    except queue.Empty:
                        check_trainer()
                spans.append(("wait", t, time.time()))
                version = snapshot["version"]
                if version == target or due(version):
                    t = time.time()
                    load_weights_into_vllm(llm, snapshot["state_dict"])
                    spans.append(("load", t, time.time()))
                if due(version):
                    evaluate(spans, evals)

        spans, evals = [], []  # (what, start, end) in seconds since the epoch; evaluations done on the way
        if due(version):
            evaluate(spans, evals)  # the starting policy, loaded from disk
        for index in range(first_batch, args.num_steps):
            check_trainer()
            take_weights(max(0, index - args.async_steps), spans, evals)  # the staleness rule
            if index == args.crash_generator_at:
                raise RuntimeError(f"generator crashed on purpose at batch {index} (--crash_generator_at)")
            prompts, t = batch_prompts(args, train_prompts, index), time.time()
            seed = (args.seed * 10**6 + index) * args.batch_size
            prompt_ids, response_ids = generate(prompts, args.temperature, args.num_samples, seed)
            spans.append(("generate", t, time.time()))
            samples_queue.put({"version": version, "prompts": prompts, "prompt_ids": prompt_ids, "response_ids": response_ids,
                               "evals": evals, "spans": spans})  # fmt: skip
            spans, evals = [], []
        take_weights(args.num_steps, spans, evals)  # the final policy, for the last evaluation
        samples_queue.put({"evals": evals, "spans": spans})
    except (KeyboardInterrupt, Stopped):
        samples_queue.cancel_join_thread()  # Ctrl-C or the trainer stopped: exit without flushing
    except BaseException:
        samples_queue.put({"error": traceback.format_exc()})  # the trainer re-raises it with this traceback
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# Checks, before any process is spawned.
def check_args(args: Args):
    """Fail with one sentence naming the fix."""

    def fail(message):
        sys.exit(f"error: {message}")

    gpus, cores = torch.cuda.device_count(), len(split_cpu_cores(share=True)[0])
    for wrong, message in [
        (args.num_samples < 2, f"--num_samples is {args.num_samples}, but online DPO compares at least 2 completions per prompt."),
        (args.beta <= 0, f"--beta is {args.beta}; it must be positive (the paper uses 0.1 on TL;DR)."),
        (args.temperature <= 0, "--temperature must be positive (the paper uses 0.7)."),
        (min(args.num_steps, args.batch_size, args.micro_batch_size, args.response_length, args.eval_every, args.eval_prompts,
             args.trainer_ranks) < 1, "--num_steps, --batch_size, --micro_batch_size, --response_length, --eval_every, "
                                      "--eval_prompts and --trainer_ranks must be at least 1."),
        (args.async_steps < 0 or args.save_every < 0, "--async_steps (0 = synchronous) and --save_every must be at least 0."),
        (args.batch_size % args.trainer_ranks, f"--batch_size {args.batch_size} does not split evenly over --trainer_ranks "
                                               f"{args.trainer_ranks}; make it a multiple of {args.trainer_ranks}."),
        (gpus and args.trainer_ranks > max(1, gpus - 1), f"--trainer_ranks {args.trainer_ranks} needs {args.trainer_ranks + 1} "
                                                         f"GPUs (GPU 0 is the generator's), but there are {gpus}; lower it."),
        (not gpus and args.trainer_ranks > cores, f"--trainer_ranks {args.trainer_ranks} is more than the {cores} CPU cores here; lower it."),
    ]:  # fmt: skip
        if wrong:
            fail(message)
    for flag, path in (("--model_name_or_path", args.model_name_or_path), ("--reward_model_path", args.reward_model_path),
                       ("--gold_reward_model_path", args.gold_reward_model_path)):  # fmt: skip
        try:
            architectures = AutoConfig.from_pretrained(path).architectures or [] if path else None
        except (OSError, ValueError):
            fail(f"{flag} {path!r} is not a transformers model folder or hub name; give one written by save_pretrained.")
        if path and "reward" in flag and not any(a.endswith("ForSequenceClassification") for a in architectures):
            fail(f"{flag} {path!r} is a {' / '.join(architectures) or 'model'}, not a sequence-classification reward "
                 "model; give one saved from AutoModelForSequenceClassification.")  # fmt: skip
    if args.reward_fn:
        try:
            load_reward(args, "", "cpu")
        except (ImportError, AttributeError, ValueError):
            fail(f"--reward_fn {args.reward_fn!r} cannot be imported; give it as module:function, with the module importable from here.")
    if args.dataset:
        try:
            columns = load_split(args, args.dataset_split, streaming=True).column_names
        except Exception as error:  # datasets raises many kinds: missing file, unknown split, no network
            fail(f"--dataset {args.dataset!r} with --dataset_split {args.dataset_split!r} cannot be loaded "
                 f"({type(error).__name__}); give a local .json/.jsonl file or a hub dataset name and one of its splits.")  # fmt: skip
        for flag, column in (("--prompt_column", args.prompt_column), ("--reference_column", args.reference_column)):
            if column and columns is not None and column not in columns:
                fail(f"--dataset {args.dataset!r} has no column {column!r} (it has {', '.join(columns)}); "
                     f"name the right one with {flag}.")  # fmt: skip


def check_lengths(args: Args, model_path: str, tokenizer, prompts: list[str]) -> int:
    """Prompt plus response must fit in the model's context. Returns the longest sequence, for vLLM."""
    longest_prompt = max(len(ids) for ids in tokenizer(prompts + ["z" * MAX_LETTERS + "="])["input_ids"])
    context = AutoConfig.from_pretrained(model_path).max_position_embeddings
    if longest_prompt + args.response_length > context:
        sys.exit(f"error: prompts of up to {longest_prompt} tokens plus --response_length {args.response_length} exceed "
                 f"the model's context of {context} tokens; lower --response_length or use shorter prompts.")  # fmt: skip
    return longest_prompt + args.response_length


# ----------------------------------------------------------------------------------------------------
# The trainer. Rank 0 is the process you started: it starts the generator and the other ranks, trades
# batches and weights with the generator, and logs. Every rank trains on its share of each batch.
class GeneratorError(RuntimeError):
    """The generator process crashed (its traceback is in the message) or died."""


def receive(samples_queue, process):
    """Next message from the generator; a crash there becomes a GeneratorError here within seconds."""
    while True:
        try:
            message = samples_queue.get(timeout=1)
        except queue.Empty:
            if process.is_alive():
                continue
            try:  # it may have died just after putting its traceback on the queue
                message = samples_queue.get(timeout=1)
            except queue.Empty:
                raise GeneratorError(f"the generator process died (exit code {process.exitcode}) without a traceback")
        if "error" in message:
            raise GeneratorError("the generator process crashed:\n" + message["error"])
        return message


def latest_checkpoint(run_dir: str):
    """The newest complete checkpoint: a half-written one still has its temporary name, so it is never picked."""
    found = sorted(glob.glob(os.path.join(run_dir, "checkpoint-*")))
    return found[-1] if found else None


def main(args: Args, rank: int = 0, port: int = 0, run_dir: str = ""):
    if rank == 0 and args.resume:  # continue with the flags the run was started with
        if not latest_checkpoint(args.resume):
            sys.exit(f"error: --resume {args.resume!r} has no checkpoint-* folder; start runs with --save_every N to write them.")
        with open(os.path.join(args.resume, "args.json")) as f:
            args = Args(**{**json.load(f), "resume": args.resume})
    if rank == 0:
        check_args(args)
    world, t_start = args.trainer_ranks, time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    base_model = args.model_name_or_path or warm_start(args)  # the reference policy, where training starts
    checkpoint = latest_checkpoint(args.resume) if args.resume else None
    model_path = os.path.join(checkpoint, "model") if checkpoint else base_model
    tokenizer = AutoTokenizer.from_pretrained(base_model)

    # Placement: the generator gets GPU 0; trainer rank r gets GPU r + 1, or shares GPU 0 on a one-GPU
    # machine. On a CPU each process is pinned to its own cores, so they run side by side without contention.
    cuda = torch.cuda.is_available()
    if cuda:
        device, generator_cores = torch.device(f"cuda:{rank + 1 if torch.cuda.device_count() > 1 else 0}"), []
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        generator_cores, trainer_cores = split_cpu_cores(args.cpu_share_cores)
        pin_to_cores(trainer_cores[rank::world] or trainer_cores)
    dtype = torch.bfloat16 if args.bf16 else torch.float32  # of the reference policy and of vLLM's weights
    state = torch.load(os.path.join(checkpoint, "trainer.pt"), weights_only=False, mmap=True) if checkpoint else {}
    start = state.get("version", 0)  # the policy version we start from; batch `start` is trained next

    reward_fn = load_reward(args, args.reward_model_path, device)  # every rank scores its own share
    if rank == 0:
        train_prompts, eval_prompts, references = load_prompts(args)
        max_model_len = check_lengths(args, base_model, tokenizer, eval_prompts + (train_prompts or []))
        gold_fn = load_reward(args, args.gold_reward_model_path, device) if args.gold_reward_model_path else reward_fn
        ref_gold = gold_fn(eval_prompts, references) if references else None  # the eval prompts never change
        time_warm_start = time.time() - t_start
        run_dir = args.resume or os.path.join(args.output_dir, f"{args.exp_name}__{args.seed}__{int(time.time())}")
        os.makedirs(run_dir, exist_ok=bool(checkpoint))
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        # A resumed run forgets what was logged after its checkpoint, then carries on as if never stopped.
        for name in ("metrics.jsonl", "samples.jsonl") if checkpoint else ():
            os.truncate(os.path.join(run_dir, name), state["offsets"][name])
        metrics_file, samples_file = (open(os.path.join(run_dir, name), "a") for name in ("metrics.jsonl", "samples.jsonl"))
        logged = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        step_log, eval_log = [r for r in logged if "step" in r], [r for r in logged if "eval/version" in r]
        version_time = state.get("version_time", {0: 0.0})  # seconds from the start until version v existed
        t_start -= state.get("elapsed", 0.0)
        pending = deque(state.get("pending", []))  # batches sampled before the checkpoint, not yet trained on
        if args.track:
            import wandb

            wandb.init(name=os.path.basename(run_dir), config=asdict(args), sync_tensorboard=True)
        writer = SummaryWriter(run_dir, purge_step=start if checkpoint else None)
        mode = f"async, generator {args.async_steps} batch(es) ahead" if args.async_steps else "synchronous"
        print(f"run {run_dir}: {mode}; {world} trainer rank(s) on {device}, policy from {model_path}")

        # Start the generator. It loads the model from disk once; after that, weights arrive by queue.
        ctx = mp.get_context("spawn")
        weights_queue, samples_queue, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        process = ctx.Process(target=generator, daemon=True, args=(args, model_path, start, start + len(pending),
                              max_model_len, generator_cores, weights_queue, samples_queue, stop))  # fmt: skip
        process.start()
        with socket.socket() as s:  # a free port for torch.distributed
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ranks = [ctx.Process(target=main, args=(args, r, port, run_dir), daemon=True) for r in range(1, world)]
        for r in ranks:
            r.start()
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops every process, as Ctrl-C does
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
        ref_policy = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(device).eval().requires_grad_(False)
        if args.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.fsdp:  # FSDP2: a rank keeps 1/R of every weight, gradient and Adam moment; a layer gathers its
            for model in (policy, ref_policy):  # full weights only while it runs
                for module in model.modules():
                    if type(module).__name__ in (model._no_split_modules or []):
                        fully_shard(module)
                fully_shard(model)
            forward = policy
        else:
            forward = DistributedDataParallel(policy)  # averages the gradients over ranks during backward
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.num_steps)
        if checkpoint:
            if args.fsdp:
                set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
            else:
                optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            random.setstate(state["rng"]["python"])
            torch.set_rng_state(state["rng"]["torch"])
        eos = policy.generation_config.eos_token_id  # vLLM stops at any of these
        eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}

        def full_weights(dtype):
            """The whole policy on rank 0, copied: the queue shares tensor memory with the generator, and the next
            optimizer step must not change weights vLLM is loading. Under FSDP every rank helps gather them."""
            if args.fsdp:
                weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            else:
                weights = policy.state_dict() if rank == 0 else {}
            return {name: w.detach().to(dtype, copy=True) for name, w in weights.items()}

        def save_checkpoint(version):
            """Everything a resumed run needs, written under a temporary name and renamed in one step when
            complete: a kill during the save leaves the previous checkpoint whole."""
            weights = full_weights(torch.float32)
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optimizer_state = get_optimizer_state_dict(policy, optimizer, options=full) if args.fsdp else optimizer.state_dict()
            if rank != 0:
                return
            while len(pending) < min(args.async_steps, args.num_steps - version):  # sampled by older versions:
                pending.append(receive(samples_queue, process))  # a resumed generator could not redo them
            metrics_file.flush(), samples_file.flush()
            tmp, final = os.path.join(run_dir, f".tmp-checkpoint-{version:06d}"), os.path.join(run_dir, f"checkpoint-{version:06d}")
            shutil.rmtree(tmp, ignore_errors=True)
            policy.save_pretrained(os.path.join(tmp, "model"), state_dict=weights)
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            torch.save({
                "version": version, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "pending": list(pending),
                "offsets": {"metrics.jsonl": metrics_file.tell(), "samples.jsonl": samples_file.tell()},
                "version_time": version_time, "elapsed": time.time() - t_start,
            }, os.path.join(tmp, "trainer.pt"))  # fmt: skip
            os.replace(tmp, final)
            for old in glob.glob(os.path.join(run_dir, "checkpoint-*")):
                if old != final:
                    shutil.rmtree(old)

        def log_evals(evals):
            """Score held-out completions with the gold reward; the KL beside it is from version v's training batch."""
            for e in evals:
                completions = tokenizer.batch_decode(e["response_ids"], skip_special_tokens=True)
                rewards = gold_fn(e["prompts"], completions)
                kl = step_log[min(e["version"], len(step_log) - 1)]["objective/kl"] if step_log else 0.0
                row = {"eval/version": e["version"], "eval/gold_reward": sum(rewards) / len(rewards), "eval/kl": kl,
                       "eval/wall_time": version_time[e["version"]]}  # fmt: skip
                if references:  # the paper's win-rate: how often the gold reward prefers ours to the reference
                    row["eval/win_rate"] = sum((r > g) + 0.5 * (r == g) for r, g in zip(rewards, ref_gold)) / len(rewards)
                eval_log.append(row)
                for name, value in row.items():
                    writer.add_scalar(name, value, e["version"])
                metrics_file.write(json.dumps(row) + "\n")
                shown = list(zip(e["prompts"], completions, rewards))[: 4]
                for p, c, r in shown:
                    samples_file.write(json.dumps({"version": e["version"], "prompt": p, "completion": c, "gold": r}) + "\n")
                examples = "  ".join((p + c)[-40:] for p, c, _ in shown)
                print(f"eval  policy v{e['version']:<4d} gold reward {row['eval/gold_reward']:.3f}  kl {kl:5.2f}  e.g. {examples}")

        # ------------------------------------------------------------------------------------------------
        # The loop: one update per batch.
        for step in range(start, args.num_steps):
            # 1. Get a batch: rank 0 takes it from the generator (it was sampled by policy version
            #    max(0, step - N)) and hands it to the other ranks. Each rank keeps its share of the prompts.
            t0 = time.time()
            batch = [(pending.popleft() if pending else receive(samples_queue, process)) if rank == 0 else None]
            dist.broadcast_object_list(batch, src=0)
            batch, t1 = batch[0], time.time()
            P, k = args.batch_size // world, args.num_samples
            prompts, prompt_ids = batch["prompts"][rank * P : (rank + 1) * P], batch["prompt_ids"][rank * P : (rank + 1) * P]
            responses = batch["response_ids"][rank * P * k : (rank + 1) * P * k]  # the k samples of a prompt side by side

            # 2. Score every completion with the reward; a completion with no EOS gets the penalty instead.
            has_eos = torch.tensor([len(r) > 0 and r[-1] in eos_ids for r in responses])
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            gold = torch.tensor(reward_fn([p for p in prompts for _ in range(k)], completions), dtype=torch.float)
            scores = apply_missing_eos_penalty(gold, has_eos, args.missing_eos_penalty).view(P, k)

            # 3. Pick chosen (best) and rejected (worst) per prompt; drop ties, they carry no preference.
            #    Every rank must run as many micro-batches as the others (DDP and FSDP exchange data in each),
            #    so a rank with fewer pairs pads with copies that weigh 0.
            chosen, rejected, valid = select_pairs(scores)
            chosen, rejected, pairs = chosen.tolist(), rejected.tolist(), valid.nonzero().squeeze(1).tolist()
            counts = [None] * world
            dist.all_gather_object(counts, len(pairs))
            weights = torch.tensor([1.0] * len(pairs) + [0.0] * (max(counts) - len(pairs)))
            pairs += [0] * (max(counts) - len(pairs))

            # 4. DPO loss on summed response log-probs of policy and reference, one update per batch. DDP and
            #    FSDP average gradients over ranks, so each rank scales its summed loss by R / (pairs in the
            #    whole batch): the update is the mean over all pairs, whatever the micro-batch size or R.
            stats = {"loss": [], "chosen_logps": [], "rejected_logps": [], "ref_chosen_logps": [], "ref_rejected_logps": []}
            for begin in range(0, len(pairs), args.micro_batch_size):
                mb, w = pairs[begin : begin + args.micro_batch_size], weights[begin : begin + args.micro_batch_size].to(device)
                sequences = [prompt_ids[i] + responses[i * k + chosen[i]] for i in mb]
                sequences += [prompt_ids[i] + responses[i * k + rejected[i]] for i in mb]
                input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id or 0)  # (2M, T)
                response_mask = mask_prompts(attention_mask, [len(prompt_ids[i]) for i in mb] * 2)
                input_ids, attention_mask, response_mask = input_ids.to(device), attention_mask.to(device), response_mask.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    logps = sequence_logprobs(forward, input_ids, attention_mask, response_mask, args.temperature)  # (2M,)
                    with torch.no_grad():
                        ref_logps = sequence_logprobs(ref_policy, input_ids, attention_mask, response_mask, args.temperature)
                chosen_logps, rejected_logps = logps.chunk(2)
                ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
                losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta, args.loss_type)
                ((losses * w).sum() * world / sum(counts)).backward()
                for name, value in zip(stats, (losses, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)):
                    stats[name].append(value[w > 0].detach().float().cpu())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()  # with every pair tied there are no gradients, and AdamW leaves the weights be
            scheduler.step()
            optimizer.zero_grad()
            t2 = time.time()

            # 5. Push the new weights; the generator loads them for batch step + 1 + N.
            snapshot = full_weights(dtype)
            if rank == 0:
                weights_queue.put({"version": step + 1, "state_dict": snapshot})
            t3 = time.time()

            # 6. Log one dict and one line per step, over all ranks' shares. Means over no pairs (all tied) are NaN.
            mine = {"scores": scores, "gold": gold, "has_eos": has_eos.float(), "valid": valid.float()}
            mine |= {name: torch.cat(values) if values else torch.zeros(0) for name, values in stats.items()}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if rank == 0:
                s = {name: torch.cat([g[name] for g in gathered]) for name in mine}
                chosen_ratio, rejected_ratio = s["chosen_logps"] - s["ref_chosen_logps"], s["rejected_logps"] - s["ref_rejected_logps"]
                metrics = {
                    "async/learner_version": step, "async/batch_version": batch["version"], "async/lag": step - batch["version"],
                    "objective/loss": s["loss"].mean().item(),
                    "objective/kl": torch.cat([chosen_ratio, rejected_ratio]).mean().item(),
                    "objective/grad_norm": grad_norm.item(), "objective/lr": lr,
                    "rewards/score": s["scores"].mean().item(), "rewards/gold": s["gold"].mean().item(),
                    "rewards/chosen_score": s["scores"].max(1).values.mean().item(),
                    "rewards/rejected_score": s["scores"].min(1).values.mean().item(),
                    "rewards/missing_eos_frac": 1 - s["has_eos"].mean().item(), "rewards/tie_frac": 1 - s["valid"].mean().item(),
                    "rewards/dpo_margin": (args.beta * (chosen_ratio - rejected_ratio)).mean().item(),
                    "rewards/dpo_accuracy": (chosen_ratio > rejected_ratio).float().mean().item(),
                    "logps/chosen": s["chosen_logps"].mean().item(), "logps/rejected": s["rejected_logps"].mean().item(),
                    "time/wait_samples": t1 - t0, "time/train": t2 - t1, "time/push_weights": t3 - t2, "time/step": t3 - t0,
                    **{f"time/{key}": sum(b - a for what, a, b in batch["spans"] if what == span) for key, span in
                       [("generate", "generate"), ("load_weights", "load"), ("wait_weights", "wait"), ("eval", "eval")]},
                }
                step_log.append(metrics)
                for name, value in metrics.items():
                    writer.add_scalar(name, value, step)
                timeline = {  # who did what when, in seconds since the start, for the benchmark's timeline plot
                    "generator": [(what, a - t_start, b - t_start, batch["version"]) for what, a, b in batch["spans"]],
                    "trainer": [(what, a - t_start, b - t_start, step) for what, a, b in [("wait", t0, t1), ("train", t1, t2), ("push", t2, t3)]],
                }
                version_time[step + 1] = t3 - t_start
                metrics_file.write(json.dumps({"step": step, **metrics, "timeline": timeline}) + "\n")
                m = metrics
                print(f"step {step + 1:3d}/{args.num_steps}  policy v{step:<3d} on batch v{batch['version']:<3d} (lag {m['async/lag']})  "
                      f"loss {m['objective/loss']:.3f}  kl {m['objective/kl']:5.2f}  score {m['rewards/score']:.3f}  gen "
                      f"{m['time/generate'] + m['time/load_weights']:.2f}s  train {m['time/train'] + m['time/push_weights']:.2f}s  "
                      f"wait {m['time/wait_samples']:.2f}s")  # fmt: skip
                log_evals(batch["evals"])
            if args.save_every and (step + 1) % args.save_every == 0:
                save_checkpoint(version=step + 1)

        final_weights = full_weights(torch.float32)
        if rank != 0:
            return
        log_evals(receive(samples_queue, process)["evals"])  # the generator evaluates the final policy
    except KeyboardInterrupt:
        sys.exit("interrupted: stopped the trainer and the generator" if rank == 0 else 1)
    except GeneratorError as error:
        sys.exit(f"error: {error}")
    finally:
        if rank == 0:
            stop.set()
            for r in ranks:
                r.kill()
            weights_queue.cancel_join_thread()  # don't block exit on snapshots the generator never read
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
            metrics_file.close(), samples_file.close(), writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------------
    # Save the model and summarise where the time went.
    policy.save_pretrained(os.path.join(run_dir, "model"), state_dict=final_weights)
    tokenizer.save_pretrained(os.path.join(run_dir, "model"))
    steady = step_log[1:] or step_log  # step 1 also waits for vLLM to start, so it is left out
    mean = {key: sum(m[key] for m in steady) / len(steady) for key in steady[0] if key.startswith("time/")}
    G = mean["time/generate"] + mean["time/load_weights"] + mean["time/eval"]
    T = mean["time/train"] + mean["time/push_weights"]
    summary = {
        "wall_time": time.time() - t_start, "warm_start_time": time_warm_start, "time_per_step": mean["time/step"],
        "generate_per_step": G, "train_per_step": T, "trainer_wait_per_step": mean["time/wait_samples"],
        "generator_wait_per_step": mean["time/wait_weights"], "load_weights_per_step": mean["time/load_weights"],
        "push_weights_per_step": mean["time/push_weights"],
        "speedup_achieved": (G + T) / mean["time/step"], "speedup_ideal": (G + T) / max(G, T),
        "eval_gold_reward_start": eval_log[0]["eval/gold_reward"], "eval_gold_reward_end": eval_log[-1]["eval/gold_reward"],
        "kl_end": step_log[-1]["objective/kl"], "lags": [m["async/lag"] for m in step_log],
    }  # fmt: skip
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\ndone in {summary['wall_time']:.1f}s (warm start {time_warm_start:.1f}s). Per step: {summary['time_per_step']:.2f}s; "
          f"generating {G:.2f}s, training {T:.2f}s; trainer waited {summary['trainer_wait_per_step']:.2f}s.\n"
          f"overlap speedup (G+T)/step: achieved {summary['speedup_achieved']:.2f}x, ideal (G+T)/max(G,T) {summary['speedup_ideal']:.2f}x.\n"
          f"eval gold reward {summary['eval_gold_reward_start']:.3f} -> {summary['eval_gold_reward_end']:.3f}, "
          f"final KL {summary['kl_end']:.2f}. Model and logs in {run_dir}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Args))
