"""What the tests share: the warm-started model, the one way they launch a program, and readers of a run folder."""

import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import async_online_dpo as A  # noqa: E402

# Small but real: the built-in model with a short warm start, shared by every test in the session.
SFT_STEPS = 30
TINY = "--num_steps 4 --batch_size 8 --micro_batch_size 4 --eval_every 2 --eval_prompts 16".split()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    A.warm_start(A.Args(cache_dir=str(path), sft_steps=SFT_STEPS))
    return str(path)


@pytest.fixture(scope="session")
def model_path(cache_dir):
    return A.warm_start(A.Args(cache_dir=cache_dir, sft_steps=SFT_STEPS))


# ----------------------------------------------------------------------------------------------------
# The one launcher: a script run as a user runs it, through subprocess, alone or under torchrun.
def start(script, cache_dir, output_dir, *flags, tiny=False, marker=None, torchrun=None, env=None):
    """`python script` (or `torchrun [torchrun] script`) with the session's warm start and this output folder (and
    with `tiny`, the TINY settings), then `flags`, which override them; with cache_dir None, `flags` alone. It runs
    in its own session, with SIGINT at its default (a terminal's; a shell's background job, as CI may be, ignores
    it), and carries `marker` in its environment, which every process it starts inherits (see processes_with)."""
    places = [*TINY * tiny, "--cache_dir", cache_dir, "--output_dir", str(output_dir), "--sft_steps", str(SFT_STEPS)]
    launcher = [sys.executable] if torchrun is None else [sys.executable, "-m", "torch.distributed.run", *torchrun]
    cmd = [*launcher, os.path.join(ROOT, script), *(places if cache_dir else []), *flags]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, ASYNC_DPO_TEST_MARKER=marker or "none", **(env or {})),
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def run_script(script, cache_dir, output_dir, *flags, timeout=300, **kwargs):
    """`start` with the TINY settings, waited for: the finished process with its output."""
    p = start(script, cache_dir, output_dir, *flags, tiny=True, **kwargs)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wrapper_script(tmp_path, prelude: str) -> str:
    """A script that runs async_online_dpo.py's main after `prelude`. The generator is spawned, so it imports this
    file again as __mp_main__: a patch in the prelude reaches the generator too."""
    wrapper = tmp_path / f"wrapper_{uuid.uuid4().hex[:8]}.py"
    wrapper.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\nimport torch\nimport tyro\nimport async_online_dpo as A\n"
        f"{prelude}\n"
        "if __name__ == '__main__':\n    A.main(tyro.cli(A.Args))\n"
    )
    return str(wrapper)


def processes_with(marker):
    """Processes still alive that carry this run's marker in their environment (the spawned generator inherits it)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"ASYNC_DPO_TEST_MARKER={marker}".encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


# ----------------------------------------------------------------------------------------------------
# Reading a run folder back.
def read_run(output_dir):
    (run_dir,) = glob.glob(os.path.join(output_dir, "*"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "step" in r]
    evals = [r for r in rows if "eval/version" in r]
    return run_dir, steps, evals


def weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def check_reloads(steps):
    """After every load of pushed weights, vLLM agreed with the trainer on the probe completion."""
    reloads = [r["async/reload_gap"] for r in steps if not math.isnan(r["async/reload_gap"])]
    assert reloads and all(gap < 1e-4 for gap in reloads), reloads


def check_run_folder(run_dir, steps, evals, initial_model, num_steps=4):
    assert [r["step"] for r in steps] == list(range(num_steps))
    assert [e["eval/version"] for e in evals] == [0, 2, 4]  # start, every --eval_every, end
    assert all(0 <= e["eval/gold_reward"] <= 1 and "eval/kl" in e for e in evals)
    assert json.load(open(os.path.join(run_dir, "args.json")))["num_steps"] == num_steps
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert samples and {"version", "prompt", "completion", "gold"} <= set(samples[0])
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["lags"] == [r["async/lag"] for r in steps]
    assert summary["generate_per_step"] > 0 and summary["train_per_step"] > 0
    assert summary["snapshot_gb"] > 0 and summary["push_gb_per_s"] > 0 and summary["load_gb_per_s"] > 0
    trained = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"))  # loads back...
    initial = AutoModelForCausalLM.from_pretrained(initial_model)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters())]
    assert sum(changed) > len(changed) // 2  # ...and training changed it
    return summary


# ----------------------------------------------------------------------------------------------------
# Reading a benchmark report back, independently of benchmark/run.py and benchmark/study.py.
def parse_tables(markdown: str) -> dict:
    """{table title: {first cell of a row: {column: cell text}}} for every table under a ### heading."""
    tables, title, header = {}, None, None
    for line in markdown.splitlines():
        if line.startswith("### "):
            title, header = line[4:], None
        elif line.startswith("|") and title:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header, tables[title] = cells, {}
            elif cells[0] != "---":
                tables[title][cells[0]] = dict(zip(header, cells, strict=True))
    return tables


def table(tables: dict, prefix: str) -> dict:
    (title,) = [t for t in tables if t.startswith(prefix)]
    return tables[title]


def assert_shows(text: str, values: list[float]):
    """The cell shows the mean of values and, for several, their sample std, to its printed precision."""
    match = re.fullmatch(r"([+-]?\d+(?:\.(\d+))?)(?: ± (\d+(?:\.\d+)?))?", text)
    assert match, f"not a number: {text!r}"
    tolerance = 0.5 * 10 ** -len(match[2] or "") + 1e-9
    assert abs(float(match[1]) - statistics.fmean(values)) <= tolerance, (text, values)
    if len(values) > 1:
        assert match[3] is not None and abs(float(match[3]) - statistics.stdev(values)) <= tolerance, (text, values)
    else:
        assert match[3] is None, text
