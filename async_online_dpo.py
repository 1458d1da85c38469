"""Asynchronous online DPO with a vLLM generator in its own process.

Reference implementation of "Asynchronous RLHF: Faster and More Efficient Off-Policy RL for Language
Models" (Noukhovitch et al., ICLR 2025, arXiv 2410.18252). A vLLM generator samples completions with a
policy that is up to N updates old while the trainer learns from the previous batch with online DPO, so
generation and training overlap. `sync_baseline.py` runs the same code with N = 0 for comparison.

    python async_online_dpo.py                      # CPU: generator and trainer on separate cores (~4 min)
    python async_online_dpo.py                      # 1 GPU: both share GPU 0 (--vllm_gpu_memory_utilization)
    CUDA_VISIBLE_DEVICES=0,1 python async_online_dpo.py   # 2 GPUs: generator on GPU 0, trainer on GPU 1
    python async_online_dpo.py --async_steps 4      # let the generator run up to 4 batches ahead
    python async_online_dpo.py --model_name_or_path PATH --reward_fn my_module:my_reward
    python sync_baseline.py                         # the same run, generation and training in turn

The trainer uses one device: with more than two GPUs, the ones after GPU 1 stay idle. See README.md
for what every logged metric means.
"""

import importlib
import json
import os
import queue
import random
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


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
    """also log to Weights & Biases (imported only when set)"""
    wandb_project: str = "async-online-dpo"
    """W&B project name, used with --track"""

    # --- model and reward
    model_name_or_path: str = ""
    """transformers causal LM folder for the policy and the frozen reference; empty = the built-in model"""
    reward_fn: str = ""
    """`module:function` taking (prompts, completions) lists of str and returning one float each;
    empty = the built-in task's gold reward"""
    sft_steps: int = 30
    """supervised warm-start steps for the built-in model (cached under --cache_dir)"""

    # --- online DPO
    num_steps: int = 128
    """policy updates; each consumes one batch of --batch_size prompts"""
    batch_size: int = 64
    """prompts per batch (the paper uses 512 on TL;DR)"""
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
    """(chosen, rejected) pairs per forward/backward; gradients accumulate to one update per batch"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # --- asynchrony
    async_steps: int = 1
    """N, how many batches the generator may run ahead: batch i may come from any policy version
    ≥ i - N. 0 is synchronous (what sync_baseline.py runs)"""

    # --- evaluation
    eval_every: int = 16
    """evaluate the policy versions that are multiples of this, and the first and last"""
    eval_prompts: int = 256
    """held-out prompts per evaluation"""
    eval_temperature: float = 0.0
    """sampling temperature for evaluation (0 = greedy)"""
    log_samples: int = 4
    """eval completions written to samples.jsonl and printed at each evaluation"""

    # --- hardware
    vllm_gpu_memory_utilization: float = 0.4
    """share of GPU 0's memory vLLM reserves; keep it low when the trainer shares GPU 0"""
    vllm_cpu_kv_cache_gib: int = 1
    """GiB of RAM vLLM reserves for its KV cache on a CPU (vLLM's own default takes most of the RAM)"""
    cpu_share_cores: bool = False
    """on a CPU, give the generator and the trainer every core instead of half each. Only sensible with
    --async_steps 0, where they take turns; the paper's setting (separate GPUs) is the split"""

    # --- testing
    crash_generator_at: int = -1
    """raise an error inside the generator when it reaches this batch (-1: never); tests use it to
    check that a generator crash stops the run with the generator's traceback"""


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


def load_reward_fn(spec: str):
    if not spec:
        return builtin_reward
    module, _, name = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


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

    print(f"warm start: building the built-in model and training it for {args.sft_steps} SFT steps (once)")
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
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        for i, p in enumerate(prompt_ids):
            labels[i, : len(p)] = -100  # learn the answer, not the prompt
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        if step % 50 == 0 or step == args.sft_steps - 1:
            print(f"  sft step {step:4d}  loss {loss.item():.3f}")
    tmp = path + f".tmp{os.getpid()}"
    model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)  # atomic: a half-written model folder is never picked up
    return path


# ----------------------------------------------------------------------------------------------------
# The generator process. It owns vLLM. Two queues and one stop signal connect it to the trainer:
#   weights_queue  trainer -> generator  {"version", "state_dict", "evaluate"}, one per update
#   samples_queue  generator -> trainer  one batch per step, tagged with the version that sampled it
#   stop           set by the trainer when it is done or has failed
#
# The only difference between async and sync is one rule: batch i may be sampled by any policy version
# >= i - N (N = --async_steps). With N = 1 the generator samples batch i+1 while the trainer learns
# from batch i, one version behind:
#
#   generator | b0 (v0) | b1 (v0) | b2 (v1) | b3 (v2) | ...        b_i (v_j): batch i sampled by version j
#   trainer   |  wait   | train b0 | train b1 | train b2 | ...      training b_i makes version i+1
#                                 ^ push v1  ^ push v2
#
# With N = 0 the generator waits for version i before batch i, and the trainer waits while it samples.
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


def generator(args: Args, model_path: str, max_model_len: int, cpu_cores: list[int], weights_queue, samples_queue, stop):
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
            model=model_path, dtype="float32", seed=args.seed, max_model_len=max_model_len,
            enforce_eager=True, enable_prefix_caching=False,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        )  # fmt: skip
        sample_params = SamplingParams(n=args.num_samples, temperature=args.temperature, max_tokens=args.response_length)
        eval_params = SamplingParams(n=1, temperature=args.eval_temperature, max_tokens=args.response_length)
        eval_prompts = builtin_prompts(random.Random("eval"), args.eval_prompts)  # held out: another stream
        version = -1

        def check_trainer():
            if stop.is_set() or not mp.parent_process().is_alive():  # done, failed, or killed outright
                raise Stopped

        def generate(prompts, params):
            outputs = llm.generate(prompts, params, use_tqdm=False)
            return [o.prompt_token_ids for o in outputs], [list(c.token_ids) for o in outputs for c in o.outputs]

        def take_weights(min_version):
            """Load the newest snapshot, first waiting until there is one of at least min_version. Older
            snapshots flagged for evaluation are loaded and evaluated on the way, so none is skipped."""
            nonlocal version
            timing, evals, snapshots = {"load_weights": 0.0, "eval": 0.0, "spans": []}, [], []
            t = time.time()
            while (snapshots[-1]["version"] if snapshots else version) < min_version:  # the staleness bound
                try:
                    snapshots.append(weights_queue.get(timeout=1))
                except queue.Empty:
                    check_trainer()
            while True:  # and take whatever newer snapshots are already waiting
                try:
                    snapshots.append(weights_queue.get_nowait())
                except queue.Empty:
                    break
            timing["wait_weights"] = time.time() - t
            timing["spans"].append(("wait", t, time.time()))
            for snapshot in snapshots:
                if snapshot is snapshots[-1] or snapshot["evaluate"]:
                    t = time.time()
                    load_weights_into_vllm(llm, snapshot["state_dict"])
                    version = snapshot["version"]
                    timing["load_weights"] += time.time() - t
                    timing["spans"].append(("load", t, time.time()))
                if snapshot["evaluate"]:
                    t = time.time()
                    _, response_ids = generate(eval_prompts, eval_params)
                    evals.append({"version": snapshot["version"], "prompts": eval_prompts, "response_ids": response_ids})
                    timing["eval"] += time.time() - t
                    timing["spans"].append(("eval", t, time.time()))
            return timing, evals

        for index in range(args.num_steps):
            check_trainer()
            timing, evals = take_weights(min_version=max(0, index - args.async_steps))
            if index == args.crash_generator_at:
                raise RuntimeError(f"generator crashed on purpose at batch {index} (--crash_generator_at)")
            prompts = builtin_prompts(random.Random(f"train-{args.seed}-{index}"), args.batch_size)
            t = time.time()
            prompt_ids, response_ids = generate(prompts, sample_params)
            timing["generate"] = time.time() - t
            timing["spans"].append(("generate", t, time.time()))
            samples_queue.put(
                {"version": version, "prompts": prompts, "prompt_ids": prompt_ids, "response_ids": response_ids,
                 "evals": evals, "timing": timing}
            )  # fmt: skip
        timing, evals = take_weights(min_version=args.num_steps)  # the final policy, for the last evaluation
        samples_queue.put({"evals": evals, "timing": timing})
    except (KeyboardInterrupt, Stopped):
        samples_queue.cancel_join_thread()  # Ctrl-C or the trainer stopped: exit without flushing
    except BaseException:
        samples_queue.put({"error": traceback.format_exc()})  # the trainer re-raises it with this traceback
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# The trainer, in the main process.
def check_args(args: Args):
    """Fail with one sentence naming the fix, before any process is spawned."""

    def fail(message):
        sys.exit(f"error: {message}")

    if args.num_samples < 2:
        fail(f"--num_samples is {args.num_samples}, but online DPO needs at least 2 completions per prompt to compare.")
    if args.beta <= 0:
        fail(f"--beta is {args.beta}; it must be positive (the paper uses 0.1 on TL;DR).")
    if args.temperature <= 0 or args.eval_temperature < 0:
        fail("--temperature must be positive (the paper uses 0.7) and --eval_temperature at least 0 (0 is greedy).")
    if min(args.num_steps, args.batch_size, args.micro_batch_size, args.response_length, args.eval_every, args.eval_prompts) < 1:
        fail("--num_steps, --batch_size, --micro_batch_size, --response_length, --eval_every and --eval_prompts must be at least 1.")
    if args.async_steps < 0:
        fail(f"--async_steps is {args.async_steps}; use 0 to train synchronously or N >= 1 to let the generator run N batches ahead.")
    if args.model_name_or_path:
        try:
            AutoConfig.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError):
            fail(f"--model_name_or_path {args.model_name_or_path!r} is not a transformers model folder; "
                 "give one written by save_pretrained, or leave it empty for the built-in model.")  # fmt: skip
    if args.reward_fn:
        try:
            load_reward_fn(args.reward_fn)
        except (ImportError, AttributeError, ValueError):
            fail(f"--reward_fn {args.reward_fn!r} cannot be imported; give it as module:function, with the module importable from here.")


def check_lengths(args: Args, model_path: str, tokenizer) -> int:
    """Prompt plus response must fit in the model's context. Returns the longest sequence, for vLLM."""
    longest_prompt = MAX_LETTERS + 1 + len(tokenizer("")["input_ids"])  # a token covers >= 1 character
    context = AutoConfig.from_pretrained(model_path).max_position_embeddings
    if longest_prompt + args.response_length > context:
        sys.exit(f"error: prompts of up to {longest_prompt} tokens plus --response_length {args.response_length} exceed "
                 f"the model's context of {context} tokens; lower --response_length to at most {context - longest_prompt}.")  # fmt: skip
    return longest_prompt + args.response_length


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


def main(args: Args):
    check_args(args)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()
    model_path = args.model_name_or_path or warm_start(args)
    reward_fn = load_reward_fn(args.reward_fn)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_model_len = check_lengths(args, model_path, tokenizer)
    time_warm_start = time.time() - t_start

    # Placement: the generator gets GPU 0; the trainer GPU 1 if there is one, else it shares GPU 0.
    # On a CPU each process is pinned to its own cores, so they run side by side without contention.
    if torch.cuda.is_available():
        device, generator_cores = torch.device(f"cuda:{min(1, torch.cuda.device_count() - 1)}"), []
    else:
        device = torch.device("cpu")
        generator_cores, trainer_cores = split_cpu_cores(args.cpu_share_cores)
        pin_to_cores(trainer_cores)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    ref_policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    ref_policy.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / args.num_steps)
    eos = policy.generation_config.eos_token_id  # vLLM stops at any of these
    eos_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}

    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, name=run_name, config=asdict(args), sync_tensorboard=True)
    writer = SummaryWriter(run_dir)
    metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "w")
    samples_file = open(os.path.join(run_dir, "samples.jsonl"), "w")
    step_log, eval_log, version_time = [], [], {}  # version_time: seconds from the start until version v existed
    mode = f"async, generator up to {args.async_steps} batch(es) ahead" if args.async_steps else "synchronous"
    print(f"run {run_dir}: {mode}; trainer on {device}, model {model_path}")

    def push_weights(version):
        """Send a snapshot, not the live parameters: the queue shares tensor memory with the other process,
        and the next optimizer step would change the weights while vLLM loads them."""
        state_dict = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        evaluate = version % args.eval_every == 0 or version == args.num_steps
        weights_queue.put({"version": version, "state_dict": state_dict, "evaluate": evaluate})

    def log_evals(evals):
        """Score the generator's held-out completions with the gold reward. The KL logged beside it is the
        one measured on policy version v's training batch (the last one, for the final version)."""
        for e in evals:
            completions = tokenizer.batch_decode(e["response_ids"], skip_special_tokens=True)
            rewards = reward_fn(e["prompts"], completions)
            kl = step_log[min(e["version"], len(step_log) - 1)]["objective/kl"]
            row = {"eval/version": e["version"], "eval/gold_reward": sum(rewards) / len(rewards), "eval/kl": kl,
                   "eval/wall_time": version_time[e["version"]]}
            eval_log.append(row)
            writer.add_scalar("eval/gold_reward", row["eval/gold_reward"], e["version"])
            writer.add_scalar("eval/kl", kl, e["version"])
            metrics_file.write(json.dumps(row) + "\n")
            shown = list(zip(e["prompts"], completions, rewards))[: args.log_samples]
            for p, c, r in shown:
                samples_file.write(json.dumps({"version": e["version"], "prompt": p, "completion": c, "gold": r}) + "\n")
            examples = "  ".join(p + c for p, c, _ in shown)
            print(f"eval  policy v{e['version']:<4d} gold reward {row['eval/gold_reward']:.3f}  kl {kl:5.2f}  e.g. {examples}")

    # ------------------------------------------------------------------------------------------------
    # Start the generator. It loads the model from disk once; after that, weights arrive by queue.
    ctx = mp.get_context("spawn")
    weights_queue, samples_queue, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    process = ctx.Process(
        target=generator, args=(args, model_path, max_model_len, generator_cores, weights_queue, samples_queue, stop), daemon=True
    )
    process.start()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops both processes, as Ctrl-C does
    try:
        version_time[0] = time.time() - t_start
        push_weights(version=0)
        for step in range(args.num_steps):
            # 1. Get a batch from the generator. It was sampled by a policy up to N updates older than ours.
            t0 = time.time()
            batch = receive(samples_queue, process)
            t1 = time.time()

            # 2. Score every completion with the reward; a completion with no EOS gets the penalty instead.
            P, k = len(batch["prompts"]), args.num_samples
            responses = batch["response_ids"]  # P*k token lists, the k samples of a prompt side by side
            has_eos = torch.tensor([len(r) > 0 and r[-1] in eos_ids for r in responses])
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            gold = torch.tensor(reward_fn([p for p in batch["prompts"] for _ in range(k)], completions), dtype=torch.float)
            scores = apply_missing_eos_penalty(gold, has_eos, args.missing_eos_penalty).view(P, k)

            # 3. Pick chosen (best) and rejected (worst) per prompt; drop ties, they carry no preference.
            chosen, rejected, valid = select_pairs(scores)
            chosen, rejected, pairs = chosen.tolist(), rejected.tolist(), valid.nonzero().squeeze(1).tolist()

            # 4. DPO loss on summed response log-probs of policy and reference, one update per batch.
            #    The loss of each micro-batch is divided by the pairs in the whole batch, so the
            #    accumulated gradient is the mean over pairs, whatever the micro-batch size.
            stats = {"loss": [], "chosen_logps": [], "rejected_logps": [], "ref_chosen_logps": [], "ref_rejected_logps": []}
            for start in range(0, len(pairs), args.micro_batch_size):
                mb = pairs[start : start + args.micro_batch_size]
                prompts = [batch["prompt_ids"][i] for i in mb]
                sequences = [p + responses[i * k + chosen[i]] for p, i in zip(prompts, mb)]
                sequences += [p + responses[i * k + rejected[i]] for p, i in zip(prompts, mb)]
                input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id or 0)  # (2M, T)
                response_mask = mask_prompts(attention_mask, [len(p) for p in prompts] * 2)
                input_ids, attention_mask, response_mask = input_ids.to(device), attention_mask.to(device), response_mask.to(device)
                logps = sequence_logprobs(policy, input_ids, attention_mask, response_mask, args.temperature)  # (2M,)
                with torch.no_grad():
                    ref_logps = sequence_logprobs(ref_policy, input_ids, attention_mask, response_mask, args.temperature)
                chosen_logps, rejected_logps = logps.chunk(2)
                ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2)
                losses = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta, args.loss_type)
                (losses.sum() / len(pairs)).backward()
                for name, value in zip(stats, (losses, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)):
                    stats[name].append(value.detach().cpu())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()  # with every pair tied there are no gradients, and AdamW leaves the weights be
            scheduler.step()
            optimizer.zero_grad()
            t2 = time.time()

            # 5. Push the new weights; the generator picks them up for its next batch.
            push_weights(version=step + 1)
            t3 = time.time()

            # 6. Log one dict and one line per step. Means over no pairs (all tied) are NaN.
            s = {name: torch.cat(values) if values else torch.zeros(0) for name, values in stats.items()}
            chosen_ratio, rejected_ratio = s["chosen_logps"] - s["ref_chosen_logps"], s["rejected_logps"] - s["ref_rejected_logps"]
            metrics = {
                "async/learner_version": step,
                "async/batch_version": batch["version"],
                "async/lag": step - batch["version"],
                "objective/loss": s["loss"].mean().item(),
                "objective/kl": torch.cat([chosen_ratio, rejected_ratio]).mean().item(),
                "objective/grad_norm": grad_norm.item(),
                "objective/lr": lr,
                "rewards/score": scores.mean().item(),
                "rewards/gold": gold.mean().item(),
                "rewards/chosen_score": scores.max(1).values.mean().item(),
                "rewards/rejected_score": scores.min(1).values.mean().item(),
                "rewards/missing_eos_frac": 1 - has_eos.float().mean().item(),
                "rewards/tie_frac": 1 - valid.float().mean().item(),
                "rewards/dpo_margin": (args.beta * (chosen_ratio - rejected_ratio)).mean().item(),
                "rewards/dpo_accuracy": (chosen_ratio > rejected_ratio).float().mean().item(),
                "logps/chosen": s["chosen_logps"].mean().item(),
                "logps/rejected": s["rejected_logps"].mean().item(),
                "time/wait_samples": t1 - t0,
                "time/train": t2 - t1,
                "time/push_weights": t3 - t2,
                "time/step": t3 - t0,
                **{f"time/{name}": seconds for name, seconds in batch["timing"].items() if name != "spans"},
            }
            step_log.append(metrics)
            for name, value in metrics.items():
                writer.add_scalar(name, value, step)
            # When each process did what, in seconds since the start, for the benchmark's timeline plot.
            timeline = {
                "generator": [(name, a - t_start, b - t_start, batch["version"]) for name, a, b in batch["timing"]["spans"]],
                "trainer": [(name, a - t_start, b - t_start, step) for name, a, b in [("wait", t0, t1), ("train", t1, t2), ("push", t2, t3)]],
            }
            version_time[step + 1] = t3 - t_start
            metrics_file.write(json.dumps({"step": step, **metrics, "timeline": timeline}) + "\n")
            print(
                f"step {step + 1:3d}/{args.num_steps}  policy v{step:<3d} on batch v{batch['version']:<3d} (lag {metrics['async/lag']})  "
                f"loss {metrics['objective/loss']:.3f}  kl {metrics['objective/kl']:5.2f}  score {metrics['rewards/score']:.3f}  "
                f"gen {metrics['time/generate'] + metrics['time/load_weights']:.2f}s  "
                f"train {metrics['time/train'] + metrics['time/push_weights']:.2f}s  wait {metrics['time/wait_samples']:.2f}s"
            )
            log_evals(batch["evals"])

        final = receive(samples_queue, process)  # the generator evaluates the final policy
        log_evals(final["evals"])
    except KeyboardInterrupt:
        sys.exit("interrupted: stopped the trainer and the generator")
    except GeneratorError as error:
        sys.exit(f"error: {error}")
    finally:
        stop.set()
        weights_queue.cancel_join_thread()  # don't block exit on snapshots the generator never read
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
        metrics_file.close()
        samples_file.close()
        writer.close()

    # ------------------------------------------------------------------------------------------------
    # Save the model and summarise where the time went.
    policy.save_pretrained(os.path.join(run_dir, "model"))
    tokenizer.save_pretrained(os.path.join(run_dir, "model"))
    steady = step_log[1:] or step_log  # step 1 also waits for vLLM to start, so it is left out
    mean = lambda key: sum(m[key] for m in steady) / len(steady)  # noqa: E731
    G = mean("time/generate") + mean("time/load_weights") + mean("time/eval")
    T = mean("time/train") + mean("time/push_weights")
    summary = {
        "wall_time": time.time() - t_start,
        "warm_start_time": time_warm_start,
        "time_per_step": mean("time/step"),
        "generate_per_step": G,
        "train_per_step": T,
        "trainer_wait_per_step": mean("time/wait_samples"),
        "generator_wait_per_step": mean("time/wait_weights"),
        "load_weights_per_step": mean("time/load_weights"),
        "push_weights_per_step": mean("time/push_weights"),
        "speedup_achieved": (G + T) / mean("time/step"),
        "speedup_ideal": (G + T) / max(G, T),
        "eval_gold_reward_start": eval_log[0]["eval/gold_reward"],
        "eval_gold_reward_end": eval_log[-1]["eval/gold_reward"],
        "kl_end": step_log[-1]["objective/kl"],
        "lags": [m["async/lag"] for m in step_log],
    }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"\ndone in {summary['wall_time']:.1f}s (warm start {time_warm_start:.1f}s). Per step: "
        f"{summary['time_per_step']:.2f}s; generating {G:.2f}s (loading weights {summary['load_weights_per_step']:.2f}s), "
        f"training {T:.2f}s (pushing weights {summary['push_weights_per_step']:.2f}s); trainer waited "
        f"{summary['trainer_wait_per_step']:.2f}s, generator waited {summary['generator_wait_per_step']:.2f}s.\n"
        f"overlap speedup (G+T)/step: achieved {summary['speedup_achieved']:.2f}x, ideal (G+T)/max(G,T) "
        f"{summary['speedup_ideal']:.2f}x.\n"
        f"eval gold reward {summary['eval_gold_reward_start']:.3f} -> {summary['eval_gold_reward_end']:.3f}, "
        f"final KL {summary['kl_end']:.2f}. Model and logs in {run_dir}"
    )


if __name__ == "__main__":
    main(tyro.cli(Args))
