"""Bad input fails fast with one sentence; a dead generator or Ctrl-C stops everything, leaving no orphans."""

import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict

import pytest
import tyro

import async_online_dpo as A

from conftest import SFT_STEPS, gone_within, processes_with, start, wrapper_script


# Bad input is checked in this process where only the message matters: main() runs as the script runs it, from the
# flags tyro parses, and must end with one sentence before it has started anything. Two cases also run as a user runs
# them, in a fresh interpreter, for what only a whole process shows: one line on stderr, and the exit code.
BAD_INPUT = [
    ("--num_samples 1", "--num_samples"),
    ("--beta 0", "--beta"),
    ("--temperature 0", "--temperature"),
    ("--response_length 0", "--response_length"),
    ("--eval_every 0", "--eval_every is 0"),
    ("--eval_every_at_end -1", "--eval_every_at_end is -1"),
    ("--async_steps -1", "--async_steps"),
    ("--model_name_or_path /no/such/model", "--model_name_or_path"),
    ("--reward_fn no_such_module:score", "--reward_fn"),
    ("--logprob_gap_tolerance 0", "--logprob_gap_tolerance"),
    ("--response_length 100", "context"),
    ("--batches_per_round 3", "--num_steps 128 is not a whole number of rounds of --batches_per_round 3"),
    ("--trainer_ranks 64", "--trainer_ranks"),
    ("--trainer_ranks 2 --batch_size 7", "--batch_size 7"),
    ("--vllm_gpu_memory_utilization 0.97", "--vllm_gpu_memory_utilization is 0.97; give vLLM's share"),
]


def fails_before_starting(capsys, cache_dir, output_dir, flags: list[str]) -> str:
    """main(), in this process, on these flags: the one sentence it ended with. It must have started no process and
    written no run folder. The signal handlers main sets on its way are put back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    places = ["--cache_dir", cache_dir, "--output_dir", str(output_dir), "--sft_steps", str(SFT_STEPS)]
    try:
        with pytest.raises(SystemExit) as stopped:
            A.main(tyro.cli(A.Args, args=places + flags, use_underscores=True))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    message = str(stopped.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in message and not A.mp.active_children()
    assert "run " not in capsys.readouterr().out and not os.path.exists(output_dir)  # nothing started
    return message


@pytest.mark.parametrize("flags, message", BAD_INPUT, ids=[flags for flags, _ in BAD_INPUT])
def test_bad_input_gives_one_sentence_before_spawning(capsys, cache_dir, tmp_path, flags, message):
    assert message in fails_before_starting(capsys, cache_dir, tmp_path / "runs", flags.split())


def test_bad_input_in_a_fresh_interpreter_is_one_line_on_stderr(cache_dir, tmp_path):
    marker = uuid.uuid4().hex
    p = start("async_online_dpo.py", cache_dir, tmp_path, "--num_samples", "1", marker=marker)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --num_samples is 1"), err
    assert "run " not in out and not os.listdir(tmp_path) and processes_with(marker) == []


def test_bad_datasets_reward_models_and_resume_folders_give_one_sentence(capsys, cache_dir, model_path, tmp_path):
    (tmp_path / "no_prompt.jsonl").write_text(json.dumps({"text": "abc="}) + "\n")
    held_out_whole = tmp_path / "data.jsonl"
    held_out_whole.write_text("".join(json.dumps({"prompt": f"{letters}="}) + "\n" for letters in ["dcba", "fed"]))
    (tmp_path / "empty_run").mkdir()
    for flags, message in [
        (["--dataset", str(tmp_path / "no_prompt.jsonl")], "--prompt_column"),
        (["--dataset", str(held_out_whole), "--eval_prompts", "8"], "--eval_prompts"),
        (["--reward_model_path", model_path], "not a sequence-classification"),
        (["--resume", str(tmp_path / "empty_run")], "has no checkpoint-* folder; start runs with --save_every"),
    ]:
        assert message in fails_before_starting(capsys, cache_dir, tmp_path / "runs", flags), flags


def test_a_mistyped_dataset_file_is_named_at_once(capsys, cache_dir, tmp_path):
    """A local file that is not there is said to be missing, without first trying the hub for it."""
    t = time.time()
    message = fails_before_starting(capsys, cache_dir, tmp_path / "runs", ["--dataset", "prompts.jsonl"])
    assert time.time() - t < 10
    assert "--dataset 'prompts.jsonl' is not a file or folder here" in message, message


def test_resuming_a_folder_that_does_not_exist_says_so(capsys, cache_dir, tmp_path):
    message = fails_before_starting(capsys, cache_dir, tmp_path / "runs", ["--resume", str(tmp_path / "no_such_run")])
    assert f"--resume {str(tmp_path / 'no_such_run')!r} is not a folder" in message, message


def test_track_without_the_wandb_client_names_the_install(capsys, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed: importing it fails
    message = fails_before_starting(capsys, cache_dir, tmp_path / "runs", ["--track"])
    assert "pip install wandb" in message, message


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(loss_type="rloo", num_samples=1),
            "--num_samples is 1, but RLOO's leave-one-out baseline needs at least 2",
        ),
        (dict(loss_type="best_of_k", num_samples=1), "--num_samples is 1, but best-of-k picks the best of at least 2"),
        (dict(loss_type="ipo", num_samples=1), "--num_samples is 1, but IPO compares at least 2"),
        (dict(updates_per_batch=0), "--updates_per_batch is 0; it must be at least 1."),
        (dict(batches_per_round=0), "--batches_per_round is 0; it must be at least 1."),
        (
            dict(num_steps=6, batches_per_round=4),
            "--num_steps 6 is not a whole number of rounds of --batches_per_round 4",
        ),
        (dict(kl_coef=-0.1), "--kl_coef is -0.1; it must be at least 0"),
        (dict(clip_range=0.0), "--clip_range is 0.0; it must be positive"),
        (dict(tis_cap=0.0), "--tis_cap is 0.0; it must be positive"),
        (dict(tis_cap=2.0, loss_type="rloo"), "--tis_cap weighs online DPO's pairs, and --loss_type rloo has none"),
        (dict(tis_cap=2.0, loss_type="best_of_k"), "--tis_cap weighs online DPO's pairs, and --loss_type best_of_k"),
    ],
)
def test_bad_settings_of_the_off_policy_study_give_one_sentence(capsys, fields, message):
    """The same check as above, in-process: check_args ends the run with one sentence, before main spawns anything."""
    with pytest.raises(SystemExit) as stopped:
        A.check_args(A.Args(**fields))
    assert str(stopped.value).startswith(f"error: {message}") and "\n" not in str(stopped.value)


def test_a_run_folder_from_an_older_version_resumes_with_its_flags(tmp_path):
    """args.json of an older run may hold flags that are gone (a test hook was one): they are left out."""
    saved = asdict(A.Args(num_steps=6, save_every=2)) | {"crash_generator_at": -1}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint-000002").mkdir()
    args = A.resumed_args(A.Args(resume=str(tmp_path)))
    assert args.num_steps == 6 and args.save_every == 2 and args.resume == str(tmp_path)


def test_an_unknown_flag_is_rejected_in_a_fresh_interpreter(cache_dir, tmp_path):
    p = start("async_online_dpo.py", cache_dir, tmp_path, "--num_stepz", "3")
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "--num_stepz" in err and "run " not in out and not os.listdir(tmp_path)


@pytest.mark.parametrize("flag, value", [("--model_size", "5m"), ("--loss_type", "ppo")])
def test_an_unknown_choice_names_the_choices_before_spawning(capsys, flag, value):
    with pytest.raises(SystemExit) as stopped:  # tyro's own check, which runs before main
        tyro.cli(A.Args, args=[flag, value], use_underscores=True)
    out, err = capsys.readouterr()
    assert stopped.value.code != 0 and f"invalid choice '{value}' for argument '{flag}'" in err
    choices = {"--model_size": "'3m', '10m', '30m'", "--loss_type": "'sigmoid', 'ipo', 'rloo', 'best_of_k'"}[flag]
    assert choices in " ".join(err.replace("│", " ").split())  # tyro wraps its message in a box
    assert "run " not in out and not A.mp.active_children()


def test_sync_baseline_refuses_async_steps(cache_dir, tmp_path):
    p = start("sync_baseline.py", cache_dir, tmp_path, "--async_steps", "2")
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and err.strip().startswith("error: sync_baseline.py always runs with --async_steps 0")


CRASH_AT_BATCH_2 = """
batch_prompts = A.batch_prompts
def crashing_batch_prompts(args, train_prompts, index):
    if A.mp.parent_process() is not None and index == 2:  # in the generator's process only
        raise RuntimeError(f"generator crashed on purpose at batch {index}")
    return batch_prompts(args, train_prompts, index)
A.batch_prompts = crashing_batch_prompts
"""


def test_generator_crash_stops_the_trainer_with_its_traceback(cache_dir, tmp_path):
    marker = uuid.uuid4().hex
    script = wrapper_script(tmp_path, CRASH_AT_BATCH_2)
    flags = ["--num_steps", "6", "--batch_size", "8", "--micro_batch_size", "4", "--eval_prompts", "8"]
    p = start(script, cache_dir, tmp_path / "out", *flags, marker=marker)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 1
    assert "the generator process crashed" in err and "Traceback" in err
    assert "generator crashed on purpose at batch 2" in err
    assert "step   2/6" in out and "step   3/6" not in out  # batches 0 and 1 came through, then it stopped
    assert processes_with(marker) == []


def test_ctrl_c_stops_both_processes(cache_dir, tmp_path):
    marker = uuid.uuid4().hex
    flags = "--num_steps 200 --batch_size 8 --micro_batch_size 4 --eval_prompts 8".split()
    p = start("async_online_dpo.py", cache_dir, tmp_path, *flags, marker=marker)
    try:
        for line in p.stdout:  # wait until training is under way
            if line.startswith("step   2/"):
                break
        assert len(processes_with(marker)) >= 2  # trainer and generator both alive
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: SIGINT to the whole group
        t = time.time()
        _, err = p.communicate(timeout=60)
        assert time.time() - t < 30
        assert p.returncode != 0 and "interrupted" in err
        assert gone_within(10, marker)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
