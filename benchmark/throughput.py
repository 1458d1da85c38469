"""Generator throughput: completion tokens per second from vLLM and from transformers' `generate`.

Both engines get the same warm-started model, the same training prompts, the same sampling settings
(k completions per prompt at the training temperature, up to --response_length tokens, stopping at EOS)
and the same cores: the ones a training run gives its generator. run.py starts one process per engine,
so vLLM's state never leaks into the transformers measurement:

    python benchmark/throughput.py --engine vllm --out vllm.json
    python benchmark/throughput.py --engine transformers --out transformers.json
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import async_online_dpo as A  # noqa: E402


@dataclass
class ThroughputArgs:
    engine: Literal["vllm", "transformers"]
    """which engine samples the completions"""
    out: str
    """JSON file that receives the measurement"""
    cache_dir: str = ".cache"
    """where the warm-started built-in model is cached (as in the training scripts)"""
    sft_steps: int = 30
    """warm-start steps of the built-in model (picks the cached model)"""
    batch_size: int = 64
    """prompts per batch, as in training"""
    num_samples: int = 2
    """k, completions per prompt, as in training"""
    batches: int = 8
    """timed batches; one more batch before them warms the engine up and is not timed"""
    seed: int = 1
    """the training prompts of this seed are used"""


def vllm_engine(args: A.Args, model_path: str, cores: list[int]):
    """vLLM set up as generator() in async_online_dpo.py sets it up on a CPU."""
    A.set_up_generator_process(args, cores)
    from vllm import LLM, SamplingParams

    max_model_len = A.check_lengths(args, A.read_starting_point(args), None, [])
    llm = LLM(
        model=model_path,
        dtype="float32",
        seed=args.seed,
        max_model_len=max_model_len,
        enforce_eager=True,
        enable_prefix_caching=False,
        gpu_memory_utilization=A.vllm_share_of_gpu_0(args, model_path),
    )
    params = SamplingParams(n=args.num_samples, temperature=args.temperature, max_tokens=args.response_length)

    def generate(prompts: list[str]) -> int:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outputs for c in o.outputs)  # EOS included, as vLLM returns it

    return generate


def transformers_engine(args: A.Args, model_path: str, cores: list[int]):
    """transformers' generate with vLLM's sampling: plain temperature sampling, no top-k or top-p."""
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    A.pin_to_cores(cores)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(prompts: list[str]) -> int:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        sequences = model.generate(
            **inputs,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.response_length,
            num_return_sequences=args.num_samples,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions = sequences[:, inputs["input_ids"].shape[1] :]  # (B*k, <= response_length)
        # A finished row is padded to the longest one: count its tokens up to and including the first EOS.
        is_eos = completions == eos
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, completions.shape[1])
        return int(first_eos.sum())

    return generate


if __name__ == "__main__":
    bench = tyro.cli(ThroughputArgs, use_underscores=True)
    sizes = dict(batch_size=bench.batch_size, num_samples=bench.num_samples)
    args = A.Args(cache_dir=bench.cache_dir, sft_steps=bench.sft_steps, seed=bench.seed, **sizes)
    model_path = A.warm_start(args)
    cores = A.split_cpu_cores()[0]  # the generator's cores in a training run
    make_engine = vllm_engine if bench.engine == "vllm" else transformers_engine
    generate = make_engine(args, model_path, cores)
    prompts = [A.batch_prompts(args, None, i) for i in range(bench.batches + 1)]  # the training run's batches
    generate(prompts[0])  # warm-up: first-call allocations and caches, not timed
    t = time.time()
    tokens = sum(generate(batch) for batch in prompts[1:])
    seconds = time.time() - t
    result = {"engine": bench.engine, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds}
    result |= {"cores": cores, "threads": torch.get_num_threads(), "temperature": args.temperature}
    result |= {"response_length": args.response_length, "model": model_path, **asdict(bench)}
    with open(bench.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{bench.engine}: {tokens} tokens in {seconds:.2f}s, {tokens / seconds:.0f} tokens/s on cores {cores}")
