"""Implementation details a review once found wrong, each tested where it could go wrong again: gradient
checkpointing, dropout and bf16, reward models that read their score at EOS, one BOS, the missing-EOS penalty, the
evaluation split and length, resuming a GPU checkpoint on a CPU (into the same W&B run), packed snapshots."""

import glob
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import async_online_dpo as A
from conftest import Run, instrumented_run, max_difference, read_run, run_script, weights


# ----------------------------------------------------------------------------------------------------
# 1. Gradient checkpointing really recomputes, and dropout is off; bf16 is used where it should be.
@pytest.fixture(scope="module")
def bf16_run(cache_dir, tmp_path_factory) -> Run:
    """A tiny run under bf16 autocast and gradient checkpointing, instrumented (conftest.INSTRUMENT)."""
    flags = "--num_steps 2 --bf16 --gradient_checkpointing".split()
    return instrumented_run(tmp_path_factory.mktemp("bf16_run"), cache_dir, *flags)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_every_layer(request, model_path, checkpointing):
    layers, forwards = request.getfixturevalue("bf16_run" if checkpointing else "tiny_run").counts()
    num_layers = AutoModelForCausalLM.from_pretrained(model_path).config.num_hidden_layers
    assert forwards >= 2  # at least one micro-batch per step
    # Each policy forward runs every layer once; under checkpointing the backward pass runs each again.
    assert layers == forwards * num_layers * (2 if checkpointing else 1)


def test_bf16_and_gradient_checkpointing(bf16_run, model_path):
    """bf16 is used: the update's logits are bfloat16 (autocast), and vLLM runs in bfloat16 and is sent bfloat16
    snapshots, while the master weights stay float32."""
    assert bf16_run.dtypes() == {"trainer torch.bfloat16", "vllm torch.bfloat16", "snapshot torch.bfloat16"}
    assert len(bf16_run.steps) == 2 and all(s["objective/grad_norm"] > 0 for s in bf16_run.steps)
    trained = weights(bf16_run.run_dir)
    assert all(w.dtype == torch.float32 for w in trained.values())  # master weights stay float32
    assert max_difference(trained, load_file(os.path.join(model_path, "model.safetensors"))) > 1e-5


def test_the_policy_trains_in_train_mode_with_no_dropout(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        attention_dropout=0.5,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    policy = A.load_policy(str(tmp_path / "m"), "cpu", gradient_checkpointing=True)
    assert policy.training and policy.is_gradient_checkpointing
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    first, second = policy(input_ids=ids).logits, policy(input_ids=ids).logits
    assert torch.equal(first, second)  # attention dropout, a function call and no module, is off too
    assert torch.allclose(first, policy.eval()(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------
# 2. A reward model reads its score at EOS.
def make_eos_reward_model(path, tokenizer, pad_is_eos=True):
    """A reward model that scores 1 for a sequence ending in EOS and 0 otherwise. Every layer adds nothing to the
    residual stream, so the score head reads the embedding of the last token, and only EOS has a component along
    the direction it reads. Its pad token is its EOS, as in tokenizers that have no pad token of their own."""
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=max(tokenizer.get_vocab().values()) + 1,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=eos if pad_is_eos else None,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 0] = 0
        embeddings[eos] = 0
        embeddings[eos, 0] = 1  # RMSNorm makes this 4 (hidden size 16)...
        model.score.weight.zero_()
        model.score.weight[0, 0] = 0.25  # ...and the head reads 1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def other_tokenizer():
    """A tokenizer with other ids and another vocabulary than the built-in policy's, which puts its BOS in front
    of every text by default, as Llama's does."""
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "<s>": 3} | {c: 10 + i for i, c in enumerate(reversed(A.LETTERS + "="))}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
    )
    tokenizer._tokenizer.decoder = decoders.Fuse()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return tokenizer


@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_reward_model_reads_its_score_at_eos(model_path, tmp_path, same_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    eos = tokenizer.eos_token_id
    rm = make_eos_reward_model(tmp_path / "rm", tokenizer if same_tokenizer else other_tokenizer())
    score = A.load_reward(A.Args(micro_batch_size=3), rm, "cpu", tokenizer, eos_ids={eos})
    prompts = ["dcba=", "zyx=", "qwerty=", "ab="]
    prompt_ids = A.tokenize(tokenizer, prompts)
    responses = A.tokenize(tokenizer, ["abcd", "xyz", "eqrtwy", "ab"])
    responses = [responses[0] + [eos], responses[1], responses[2] + [eos], responses[3]]  # ended, cut off, ...
    seen = []  # the ids the reward model embeds, row by row
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: seen.extend(inputs[0].tolist()) if isinstance(module, torch.nn.Embedding) else None
    )
    try:
        assert score(prompts, prompt_ids, responses) == pytest.approx([1, 0, 1, 0], abs=1e-5)
    finally:
        hook.remove()
    if not same_tokenizer:  # its own tokenizer's special tokens: its BOS, once, even where the prompt had one
        assert score(["<s>dcba="], prompt_ids[:1], responses[:1]) == pytest.approx([1], abs=1e-5)
        rows = [[t for t in row if t != 0] for row in seen]  # padding (id 0) removed
        assert len(rows) == 4 and all(row[0] == 3 and row.count(3) == 1 for row in rows), rows


def test_a_run_scores_with_the_reward_model_at_eos(cache_dir, model_path, tmp_path):
    """End to end, with the penalty off: the reward is 1 exactly for the completions that ended."""
    rm = make_eos_reward_model(tmp_path / "rm", AutoTokenizer.from_pretrained(model_path))
    flags = ["--reward_model_path", rm, *"--num_steps 2 --eval_every 1 --missing_eos_penalty None".split()]
    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "out", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path / "out")
    for s in steps:  # with the penalty off, the score is the reward model's alone
        assert s["rewards/score"] == pytest.approx(1 - s["rewards/missing_eos_frac"], abs=1e-5)
        assert s["rewards/score"] == pytest.approx(s["rewards/unpenalized"], abs=1e-6)
    assert any(0 < s["rewards/missing_eos_frac"] < 1 for s in steps)  # both kinds were scored
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert any(s["eos"] for s in samples)
    assert all(s["gold"] == pytest.approx(float(s["eos"]), abs=1e-5) for s in samples)


# ----------------------------------------------------------------------------------------------------
# 3. One BOS: vLLM and the trainer get the same prompt ids, as the prompt wrote them.
def test_prompts_reach_vllm_with_the_one_bos_they_were_written_with(sync_run, bos_model):
    """sync_run: the prompts of a dataset start with <s>, and the model's tokenizer would add another."""
    tokenizer = AutoTokenizer.from_pretrained(bos_model)
    assert tokenizer("ab=")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer would add one...
    prompts = [s["prompt"] for s in map(json.loads, open(os.path.join(sync_run.run_dir, "samples.jsonl")))]
    assert prompts and all(p.startswith("<s>") for p in prompts)  # ...to prompts that have one already
    assert "warning" not in sync_run.result.stderr  # the prompts carry their BOS: nothing to warn about
    # vLLM's log-probs of the sampled tokens are the trainer's: both saw the very same prompt ids.
    assert all(s["async/logprob_gap"] < 1e-4 for s in sync_run.steps)
    assert A.tokenize(tokenizer, prompts[:1])[0].count(tokenizer.bos_token_id) == 1


# ----------------------------------------------------------------------------------------------------
# 4. --missing_eos_penalty: off with None, and a positive value warns (TRL's flag subtracts).
def test_a_positive_missing_eos_penalty_warns(capsys):
    A.check_args(A.Args(missing_eos_penalty=1.0))
    assert "warning: --missing_eos_penalty 1.0 is positive" in capsys.readouterr().err
    A.check_args(A.Args(missing_eos_penalty=-1.0))
    A.check_args(A.Args(missing_eos_penalty=None))
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------
# 5. Evaluation on a held-out split, at its own length; 6. resume from a checkpoint saved on a GPU.
def test_eval_split_and_length_then_resume_a_gpu_checkpoint_on_a_cpu_into_the_same_wandb_run(cache_dir, tmp_path):
    """Tracked with W&B (offline, the real client): the resumed run continues the W&B run it was started with."""
    rng = A.random.Random(5)
    splits = {"train": "abcdefghijklm", "validation": "nopqrstuvwxyz"}  # no letter in common
    data = tmp_path / "data"
    data.mkdir()
    for split, letters in splits.items():
        with open(data / f"{split}.jsonl", "w") as f:
            for _ in range(40):
                f.write(json.dumps({"prompt": "".join(rng.choices(letters, k=rng.randint(6, 10))) + "="}) + "\n")
    flags = ["--dataset", str(data), *"--eval_split validation --eval_prompts 8 --response_length 4".split()]
    flags += "--eval_response_length 14 --num_steps 3 --save_every 2 --eval_every 2 --track".split()
    wandb_env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    result = run_script("async_online_dpo.py", cache_dir, tmp_path / "out", *flags, env=wandb_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir, steps, evals = read_run(tmp_path / "out")
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and all(set(s["prompt"][:-1]) <= set(splits["validation"]) for s in samples)
    assert max(len(s["completion"]) for s in samples) > 4  # longer than training's --response_length
    assert max(len(s["completion"]) for s in samples) <= 14

    # The checkpoint of a run on GPUs: every tensor in trainer.pt is tagged with the GPU that saved it.
    checkpoint = os.path.join(run_dir, "checkpoint-000002", "trainer.pt")
    state = torch.load(checkpoint, weights_only=False)
    tag = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:1"
    try:
        torch.save(state, checkpoint)
    finally:
        torch.serialization.location_tag = tag
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with it on a CPU
        torch.load(checkpoint, weights_only=False)
    resumed = run_script("async_online_dpo.py", cache_dir, tmp_path / "unused", "--resume", run_dir, env=wandb_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-000002" in resumed.stdout
    _, resumed_steps, _ = read_run(tmp_path / "out")  # the log is cut back to the checkpoint, then continued
    assert [s["step"] for s in resumed_steps] == [0, 1, 2]
    assert resumed_steps[2]["async/batch_version"] == steps[2]["async/batch_version"]
    wandb_runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))  # one folder per process that logged
    assert len(wandb_runs) == 2 and all(r.endswith("-" + os.path.basename(run_dir)) for r in wandb_runs), wandb_runs


# ----------------------------------------------------------------------------------------------------
# 7. The generator says when vLLM is up (tests/test_weight_sync.py checks it is the first message);
# 8. snapshots are one packed buffer, and one at a time.
def test_a_snapshot_is_one_buffer_of_views(model_path):
    policy = AutoModelForCausalLM.from_pretrained(model_path)
    for dtype in (torch.float32, torch.bfloat16):
        buffer, layout = A.pack_weights(policy, dtype, "cpu", is_rank_0=True)
        assert buffer.dtype == dtype and buffer.is_shared()
        weights = A.unpack_weights(buffer, layout)
        assert [name for name, _ in weights] == [n for n, w in policy.state_dict().items() if w.is_floating_point()]
        for name, w in weights:
            assert w.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # a view, not a copy
            assert torch.equal(w, policy.state_dict()[name].to(dtype))
    assert A.pack_weights(policy, torch.float32, "cpu", is_rank_0=False) is None
    tied = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    )
    names = [name for name, _, _ in A.pack_weights(tied, torch.float32, "cpu", is_rank_0=True)[1]]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # sent once; vLLM ties it again


def test_the_trainer_waits_for_the_snapshot_slot_and_notices_a_dead_generator():
    ctx = A.mp.get_context("spawn")
    snapshot_free, samples_queue = ctx.Semaphore(1), ctx.Queue()
    process = ctx.Process(target=time.sleep, args=(3,))
    process.start()
    assert A.wait_for_snapshot_slot(snapshot_free, samples_queue, process) < 1  # free: no wait
    samples_queue.put(A.GeneratorFailed("Traceback: the generator's own"))
    t = time.time()
    with pytest.raises(A.GeneratorError, match="the generator's own"):  # taken, and the generator dies holding it
        A.wait_for_snapshot_slot(snapshot_free, samples_queue, process)
    assert 2 < time.time() - t < 10
    process.join()
