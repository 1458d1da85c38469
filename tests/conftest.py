"""What the tests share: the warm-started model, the one way they launch a program, and readers of a run folder."""

import ast
import glob
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import async_online_dpo as A  # noqa: E402


ALL_CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def keep_to_this_workers_cores():
    """The test command runs two test files at a time (pytest-xdist's -n 2): each worker, and every process its tests
    start, keeps to its own share of the cores, so that the runs of two workers do not crowd onto one core while the
    other idles. Tests that need more cores ask for `every_core`."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker and count > 1 and ALL_CORES and len(ALL_CORES) >= count:
        share = ALL_CORES[int(worker.removeprefix("gw")) % count :: count]
        os.sched_setaffinity(0, share)
        torch.set_num_threads(len(share))


keep_to_this_workers_cores()


@pytest.fixture
def every_core():
    """The test's processes may use every core of the machine (several trainer ranks need a core each)."""
    if ALL_CORES is None:
        yield
        return
    share = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, share)


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


def wrapper_script(tmp_path, prelude: str, script: str = "async_online_dpo.py") -> str:
    """A script that runs `script` (async_online_dpo.py or sync_baseline.py) as its own __main__ after `prelude`. The
    generator is spawned, so it imports this file again as __mp_main__: a patch in the prelude reaches it too."""
    wrapper = tmp_path / f"wrapper_{uuid.uuid4().hex[:8]}.py"
    run = {  # the scripts' own __main__; sync_baseline.py calls the main of the module patched here
        "async_online_dpo.py": "A.main(tyro.cli(A.Args, use_underscores=True))",
        "sync_baseline.py": f"runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')",
    }[script]
    wrapper.write_text(
        f"import runpy, sys\nsys.path.insert(0, {ROOT!r})\nimport torch\nimport tyro\nimport async_online_dpo as A\n"
        f"{prelude}\nif __name__ == '__main__':\n    {run}\n"
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


def gone_within(seconds: float, marker) -> bool:
    """Whether every process that carries the marker has exited within this many seconds (polled, not slept)."""
    deadline = time.time() + seconds
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.1)
    return processes_with(marker) == []


# ----------------------------------------------------------------------------------------------------
# Runs that several tests read, made once. Each is instrumented: the trainer counts the policy's forward passes and
# decoder layers run under gradients (its update) and records the dtype of the update's logits, and prints both when
# it ends; the generator prints the dtype vLLM runs in and is sent at each load (it exits without running atexit
# handlers). The hooks only count: the run computes what an uninstrumented one does. Trainer and generator share one
# stdout, and print() writes a line in pieces that the other process can split, so each record is one write, found
# anywhere in the output.
INSTRUMENT = """
import atexit, collections, os
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
counts, dtypes = {"layers": 0, "models": 0}, collections.Counter()
def count(module, inputs):
    if torch.is_grad_enabled():  # the policy, forward and recompute; the reference runs without gradients
        counts["layers"] += isinstance(module, LlamaDecoderLayer)
        counts["models"] += isinstance(module, LlamaModel)
torch.nn.modules.module.register_module_forward_pre_hook(count)
def record(module, inputs, output):
    if torch.is_grad_enabled() and type(module).__name__ == "LlamaForCausalLM":
        dtypes["trainer " + str(output.logits.dtype)] += 1
torch.nn.modules.module.register_module_forward_hook(record)
load = A.load_weights_into_vllm
def recording_load(llm, named_tensors):  # the generator alone loads weights into vLLM
    loaded = {"vllm " + str(llm.model_config.dtype): 1, "snapshot " + str(named_tensors[0][1].dtype): 1}
    os.write(1, f"GENERATOR DTYPES {loaded}\\n".encode())
    load(llm, named_tensors)
A.load_weights_into_vllm = recording_load
atexit.register(lambda: os.write(1, f"COUNTS {counts['layers']} {counts['models']} DTYPES {dict(dtypes)}\\n".encode()))
"""


@dataclass
class Run:
    """A finished run: the process's output, and its run folder read back."""

    result: subprocess.CompletedProcess
    run_dir: str
    steps: list[dict]
    evals: list[dict]

    def counts(self) -> tuple[int, int]:
        """Decoder layers and policy forward passes run under gradients, in the trainer: the last process to end."""
        layers, forwards = re.findall(r"COUNTS (\d+) (\d+) DTYPES", self.result.stdout)[-1]
        return int(layers), int(forwards)

    def dtypes(self) -> set[str]:
        """The dtypes each process recorded: the trainer's update, vLLM and the snapshots it loaded."""
        records = re.findall(r"(?:COUNTS \d+ \d+|GENERATOR) DTYPES (\{[^}]*\})", self.result.stdout)
        return {k for record in records for k in ast.literal_eval(record)}


def instrumented_run(tmp_path, cache_dir, *flags, script="async_online_dpo.py") -> Run:
    """`script` with the TINY settings and these flags, through a wrapper that instrumented it (INSTRUMENT)."""
    wrapper = wrapper_script(tmp_path, INSTRUMENT, script)
    result = run_script(wrapper, cache_dir, tmp_path / "out", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(result, *read_run(tmp_path / "out"))


@pytest.fixture(scope="session")
def tiny_run(cache_dir, tmp_path_factory) -> Run:
    """The tiny async run with default flags (A = 1): the end-to-end test, the layer count and the ranks' reference."""
    return instrumented_run(tmp_path_factory.mktemp("tiny_run"), cache_dir)


@pytest.fixture(scope="session")
def bos_model(model_path, tmp_path_factory) -> str:
    """The built-in model with a tokenizer that puts <s> in front of every text by default, as Llama's does."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    model = AutoModelForCausalLM.from_pretrained(model_path)
    model.resize_token_embeddings(len(tokenizer))
    model.config.bos_token_id = bos
    model.generation_config.bos_token_id = bos
    path = tmp_path_factory.mktemp("bos_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sync_run(cache_dir, bos_model, tmp_path_factory) -> Run:
    """sync_baseline.py with the TINY settings on a dataset of prompts that start with <s>, for bos_model: the sync
    test and the one-BOS test (implementation detail 11)."""
    tmp_path = tmp_path_factory.mktemp("sync_run")
    prompts = ["<s>" + p for p in A.builtin_prompts(A.random.Random(3), 48)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    flags = ["--model_name_or_path", bos_model, "--dataset", str(tmp_path / "data.jsonl")]
    result = run_script("sync_baseline.py", cache_dir, tmp_path / "out", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(result, *read_run(tmp_path / "out"))


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
# The benchmark's and the study's scripts as a user runs them.
def broken_cache(tmp_path, *sizes: str) -> str:
    """A --cache_dir whose warm-started models of these sizes cannot be loaded: a run that needs one fails at once."""
    for size in sizes:
        broken = tmp_path / "cache" / f"builtin-sort-{size}-sft{SFT_STEPS}"
        broken.mkdir(parents=True)
        (broken / "config.json").write_text("not json")
    return str(tmp_path / "cache")


RUNS = os.path.join(ROOT, "runs")


def clean_up_runs(folders, runs_existed: bool):
    """Delete these folders of the repository's runs/, and runs/ itself if it is empty now and was not there before."""
    for folder in folders:
        shutil.rmtree(os.path.join(ROOT, folder))
    if not runs_existed and os.path.isdir(RUNS) and not os.listdir(RUNS):
        try:
            os.rmdir(RUNS)
        except OSError:  # the test command runs two files at once: another test may have just written there
            pass


def interrupt(p, started: str, marker: str) -> str:
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group) to p, started by conftest's `start` with this
    marker, a few seconds after a line of its output begins with `started`. It must stop within 30 s, with its run,
    and end with one line on stderr and no traceback; that line is returned."""
    try:
        line = next((line for line in p.stdout if line.startswith(started)), None)
        assert line is not None, p.stderr.read()[-3000:]
        time.sleep(3)  # the step it announced is under way
        os.killpg(p.pid, signal.SIGINT)
        t = time.time()
        _, err = p.communicate(timeout=60)
        assert time.time() - t < 30
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("interrupted: "), err
    assert gone_within(10, marker)  # its run's processes too
    return lines[-1]


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


def check_committed_report_rebuilds(script: str, folder: str, tmp_path):
    """The full report the README quotes (folder, under benchmark/): `script --report_only` gives its results.md back
    from its raw/ alone."""
    copy = str(tmp_path / "results")
    shutil.copytree(os.path.join(ROOT, "benchmark", folder), copy)
    os.remove(os.path.join(copy, "results.md"))
    result = run_script(os.path.join(ROOT, "benchmark", script), None, None, "--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        open(os.path.join(copy, "results.md")).read()
        == open(os.path.join(ROOT, "benchmark", folder, "results.md")).read()
    )


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
