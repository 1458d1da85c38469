"""Bad input fails fast with one sentence; a dead generator or Ctrl-C stops everything, leaving no orphans."""

import json
import os
import signal
import time
import uuid
from dataclasses import asdict

import pytest

import async_online_dpo as A

from conftest import processes_with, start, wrapper_script


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_samples", "1"], "--num_samples"),
        (["--beta", "0"], "--beta"),
        (["--temperature", "0"], "--temperature"),
        (["--response_length", "0"], "--response_length"),
        (["--eval_every", "0"], "--eval_every is 0"),
        (["--async_steps", "-1"], "--async_steps"),
        (["--model_name_or_path", "/no/such/model"], "--model_name_or_path"),
        (["--reward_fn", "no_such_module:score"], "--reward_fn"),
        (["--logprob_gap_tolerance", "0"], "--logprob_gap_tolerance"),
        (["--response_length", "100"], "context"),
        (["--batches_per_round", "3"], "--num_steps 128 is not a whole number of rounds of --batches_per_round 3"),
    ],
)
def test_bad_input_gives_one_sentence_before_spawning(cache_dir, tmp_path, flags, message):
    marker = uuid.uuid4().hex
    p = start("async_online_dpo.py", cache_dir, tmp_path, *flags, marker=marker)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err and "run " not in out  # nothing started
    assert not os.listdir(tmp_path)  # no run folder either


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
    ],
)
def test_bad_settings_of_the_off_policy_study_give_one_sentence(capsys, fields, message):
    """The same check as above, in-process: check_args ends the run with one sentence, before main spawns anything."""
    with pytest.raises(SystemExit) as stopped:
        A.check_args(A.Args(**fields))
    assert str(stopped.value).startswith(f"error: {message}") and "\n" not in str(stopped.value)


def test_a_dataset_held_out_whole_gives_one_sentence(cache_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{letters}="}) + "\n" for letters in ["dcba", "fed", "ihg"]))
    p = start("async_online_dpo.py", cache_dir, tmp_path / "out", "--dataset", str(data), "--eval_prompts", "8")
    _, err = p.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # datasets prints progress too
    assert p.returncode != 0 and len(errors) == 1 and err.strip().endswith(errors[0]), err
    assert "--eval_prompts" in errors[0] and "Traceback" not in err


def test_a_run_folder_from_an_older_version_resumes_with_its_flags(tmp_path):
    """args.json of an older run may hold flags that are gone (a test hook was one): they are left out."""
    saved = asdict(A.Args(num_steps=6, save_every=2)) | {"crash_generator_at": -1}
    (tmp_path / "args.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoint-000002").mkdir()
    args = A.resumed_args(A.Args(resume=str(tmp_path)))
    assert args.num_steps == 6 and args.save_every == 2 and args.resume == str(tmp_path)


def test_unknown_flag_is_rejected(cache_dir, tmp_path):
    p = start("async_online_dpo.py", cache_dir, tmp_path, "--num_stepz", "3")
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "--num_stepz" in err


@pytest.mark.parametrize("flag, value", [("--model_size", "5m"), ("--loss_type", "ppo")])
def test_an_unknown_choice_names_the_choices_before_spawning(cache_dir, tmp_path, flag, value):
    p = start("async_online_dpo.py", cache_dir, tmp_path, flag, value)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and f"invalid choice '{value}' for argument '{flag}'" in err
    choices = {"--model_size": "'3m', '10m', '30m'", "--loss_type": "'sigmoid', 'ipo', 'rloo', 'best_of_k'"}[flag]
    assert choices in " ".join(err.replace("│", " ").split())  # tyro wraps its message in a box
    assert "run " not in out and not os.listdir(tmp_path)


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
        time.sleep(1)
        assert processes_with(marker) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
