"""The GPU memory estimate (docs/gpus.md, Memory) for the recipes docs/gpus.md gives, from the models' configs alone,
against a hand computation; the page's tables against the estimate; the warning a run prints. No GPU is needed: the
estimate reads configs and flags, and the models are built on the meta device."""

import os
import re

import pytest
from transformers import GPTNeoXConfig, LlamaConfig

import async_online_dpo as A
from conftest import ROOT

# The recipes' models, as their config.json files describe them (no download here), with their parameter counts as
# their model cards give them.
LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
)
PYTHIA = {
    "1b": dict(vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=8),
    "6.9b": dict(
        vocab_size=50432, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32
    ),
}
PARAMS = {"llama-8b": 8_030_261_248, "pythia-1b": 1_011_781_632, "pythia-6.9b": 6_857_302_016}
PROMPT = 512  # the page's assumption: prompts of up to 512 tokens


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """Each recipe model's shape, from a folder that holds its config.json alone."""
    found = {}
    for name, config, head in [
        ("llama-8b", LlamaConfig(**LLAMA_8B), "LlamaForSequenceClassification"),
        ("pythia-1b", GPTNeoXConfig(**PYTHIA["1b"], rotary_pct=0.25), "GPTNeoXForSequenceClassification"),
        ("pythia-6.9b", GPTNeoXConfig(**PYTHIA["6.9b"], rotary_pct=0.25), "GPTNeoXForSequenceClassification"),
    ]:
        path = tmp_path_factory.mktemp(name)
        config.save_pretrained(path)
        found[name] = A.model_shape(str(path))
        config.architectures, config.num_labels = [head], 1
        config.save_pretrained(path)
        found[name + " reward"] = A.model_shape(str(path), A.AutoModelForSequenceClassification)
    return found


def recipes(shapes) -> dict:
    """docs/gpus.md's recipes: (flags, model shapes, longest prompt + response, GPUs)."""
    tldr = A.Args(
        bf16=True, micro_batch_size=16, response_length=53, eval_response_length=128, batch_size=512, num_steps=256
    )
    tldr_models = {"policy": shapes["pythia-1b"], "reward": shapes["pythia-1b reward"]}
    tldr_models["gold"] = shapes["pythia-6.9b reward"]
    no_robots = A.Args(
        fsdp=True, bf16=True, gradient_checkpointing=True, trainer_ranks=4, micro_batch_size=4, response_length=1024
    )
    no_robots_models = {"policy": shapes["llama-8b"], "reward": shapes["llama-8b reward"]}
    return {
        "TL;DR, Pythia 1B, 2 GPUs": (tldr, tldr_models, PROMPT + 128, 2),
        "No Robots, LLaMA 3.1 8B, 5 GPUs": (no_robots, no_robots_models, PROMPT + 1024, 5),
    }


def test_a_models_shape_is_read_from_its_config(shapes):
    for name, params in PARAMS.items():
        assert shapes[name].params == params, name
    llama = shapes["llama-8b"]
    assert llama.layers == 32 and llama.block == 218_112_000 and llama.vocab == 128256
    assert llama.root == PARAMS["llama-8b"] - 32 * 218_112_000  # embeddings, head and the last norm
    assert llama.kv_per_token == 2 * 32 * 8 * 128
    # A reward model has a score head of one output where the causal LM has its vocabulary head.
    assert shapes["llama-8b reward"].params == PARAMS["llama-8b"] - 128256 * 4096 + 4096
    assert shapes["pythia-6.9b reward"].params == PARAMS["pythia-6.9b"] - 50432 * 4096 + 4096


def test_the_estimate_is_the_rule_computed_by_hand(shapes):
    """docs/gpus.md's rule, item by item, for both recipes on 80 GB GPUs."""
    gb = 1e9
    tldr, llama = recipes(shapes).values()
    # TL;DR: no FSDP, bf16, 32 sequences a micro-batch (16 pairs), no checkpointing.
    p, rm, gold = PARAMS["pythia-1b"], 908_761_088, 6_650_736_640
    rank_0 = {
        "policy, gradients and Adam (float32)": 16 * p / gb,
        "autocast's bfloat16 weights": 2 * p / gb,
        "reference": 2 * p / gb,
        "reward model": 2 * rm / gb,
        "logits and their gradient": (2 * 32 * 54 * 50304 * 2 + 3 * 4 * 54 * 50304) / gb,
        "activations": 32 * 640 * 2048 * 16 * 24 * 2 / gb,
        "CUDA context": 1.0,
        "gold reward model": 2 * gold / gb,
    }
    share = round(0.9 - (2 * p / gb + 2) / 80, 2)
    gpu_0 = {
        f"vLLM's share ({share:.2f} of the GPU)": share * 80,
        "vLLM beyond its share": (2 * shapes["pythia-1b"].block + 1024 * 50304 * 4) / gb,
        "weight snapshot": 2 * p / gb,
        "rank 0's CUDA context": 1.0,
    }
    needs = A.memory_needs(*tldr[:3], 2, 80.0)
    assert list(needs) == ["GPU 0", "GPU 1"]
    assert needs["GPU 0"] == pytest.approx(gpu_0) and needs["GPU 1"] == pytest.approx(rank_0)
    # No Robots: FSDP2 over 4 ranks, bf16, gradient checkpointing, 8 sequences a micro-batch (4 pairs).
    p, rm, block = PARAMS["llama-8b"], 7_504_928_768, 218_112_000
    rank = {
        "policy, gradients and Adam (float32)": 16 * p / 4 / gb,
        "reference": 2 * p / 4 / gb,
        "reward model": 2 * rm / gb,
        "logits and their gradient": (2 * 8 * 1025 * 128256 * 2 + 3 * 4 * 1025 * 128256) / gb,
        "activations": 8 * 1536 * 4096 * (32 * 2 + 24 * 2) / gb,  # bfloat16 layer inputs: FSDP2 gathers bfloat16
        "FSDP2's gathered root and blocks": 2 * ((p - 32 * block) + 2 * block) * 2 / gb,
        "CUDA context": 1.0,
    }
    needs = A.memory_needs(*llama[:3], 5, 80.0)
    assert needs["GPU 1"] == pytest.approx(rank) and needs["GPU 4"] == pytest.approx(rank)
    assert list(needs) == ["GPU 0", "GPU 1", "GPU 2", "GPU 3", "GPU 4"]
    assert max(sum(items.values()) for items in needs.values()) < 80  # the recipe fits an 80 GB GPU


def page_tables() -> dict:
    """docs/gpus.md's memory tables: {recipe: {GPU: (total, {item: GB})}}, as the page prints them."""
    page = open(os.path.join(ROOT, "docs", "gpus.md")).read()
    found = {}
    for recipe, table in re.findall(r"^\| (.+?), in GB \|.*\n\|[- |]+\n((?:\|.*\n)+)", page, flags=re.M):
        rows = [[c.strip() for c in line.strip("|\n").split("|")] for line in table.splitlines()]
        found[recipe] = {gpu: (total, items) for gpu, items, total in rows}
    return found


def test_the_pages_tables_are_the_estimate(shapes):
    tables = page_tables()
    assert set(tables) == set(recipes(shapes))
    for recipe, (args, models, longest, gpus) in recipes(shapes).items():
        needs = A.memory_needs(args, models, longest, gpus, 80.0)
        assert list(tables[recipe]) == [gpu.replace("GPU ", "") for gpu in needs], recipe
        for gpu, items in needs.items():
            total, shown = tables[recipe][gpu.replace("GPU ", "")]
            assert total == f"{sum(items.values()):.1f}", (recipe, gpu)
            assert shown == ", ".join(f"{item} {gb:.1f}" for item, gb in items.items()), (recipe, gpu)


def test_a_gpu_with_too_little_memory_gets_one_sentence_naming_the_flags(shapes):
    args, models, longest, gpus = recipes(shapes)["No Robots, LLaMA 3.1 8B, 5 GPUs"]
    needs = A.memory_needs(args, models, longest, gpus, 24.0)  # GPUs of 24 GB
    lines, warnings = A.memory_report(args, needs, models, longest, gpus, 24.0)
    assert len(lines) == 1 + gpus and lines[1].startswith("  GPU 0: ")
    assert warnings and all(w.startswith("warning: ") and w.count(". ") == 0 for w in warnings)
    rank_1 = [w for w in warnings if w.startswith("warning: GPU 1 ")]
    assert rank_1 == [
        "warning: GPU 1 may need 70 GB, more than its 24: lower --micro_batch_size, or use more ranks under --fsdp "
        "(docs/gpus.md)."
    ]  # the flags it has already are not offered again
    # vLLM's share on 24 GB, 0.15, cannot hold the 8B policy's 16 GB of weights
    assert any(w.startswith("warning: vLLM's share of GPU 0, 4 GB, cannot hold its weights") for w in warnings)
    fits = A.memory_needs(args, models, longest, gpus, 80.0)
    assert A.memory_report(args, fits, models, longest, gpus, 80.0)[1] == []
    # On one GPU the trainer gets what vLLM's share leaves: the 1B recipe's trainer does not fit beside 0.4 of 80 GB.
    tldr, tldr_models, tldr_longest, _ = recipes(shapes)["TL;DR, Pythia 1B, 2 GPUs"]
    one = A.memory_needs(tldr, tldr_models, tldr_longest, 1, 80.0)
    (warning,) = A.memory_report(tldr, one, tldr_models, tldr_longest, 1, 80.0)[1][-1:]
    assert warning == (
        "warning: the trainer may need 70 GB of GPU 0, more than the 44 that vLLM's share leaves it: lower "
        "--vllm_gpu_memory_utilization, or lower --micro_batch_size, or use --gradient_checkpointing (docs/gpus.md)."
    )


def test_vllms_share_of_gpu_0(shapes):
    policy = shapes["llama-8b"]
    one = A.Args(bf16=True)
    assert A.vllm_gpu_share(one, policy, 1, 80.0) == 0.4  # a GPU the trainer shares
    assert A.vllm_gpu_share(one, policy, 5, 80.0) == round(0.9 - (2 * PARAMS["llama-8b"] / 1e9 + 2) / 80, 2)
    assert A.vllm_gpu_share(A.Args(bf16=True, vllm_gpu_memory_utilization=0.5), policy, 5, 80.0) == 0.5
    assert A.vllm_gpu_share(A.Args(), policy, 5, 24.0) == 0.1  # float32 weights larger than the GPU: its floor
