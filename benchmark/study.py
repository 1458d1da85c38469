"""The paper's off-policy study on the built-in task: how much off-policy data each loss tolerates, at three
policy sizes, and what its two compute optimizations cost.

    python benchmark/study.py                # full: 2 seeds, 64 updates a run, 34 runs (about 100 min on 2 CPU cores)
    python benchmark/study.py --quick        # 1 seed, 24 updates, N in {1, 8}, sizes 3m and 10m (under 15 min)
    python benchmark/study.py --tiny         # seconds a run, for CI (tests/test_study.py)
    python benchmark/study.py --resume       # go on with an interrupted study: its finished runs are kept
    python benchmark/study.py --report_only  # rebuild results.md, results.json and the plots from raw/

Every run is sync_baseline.py with the paper's N (--batches_per_round N): one policy version samples N batches,
which are trained on at lags 0 .. N - 1, as in the paper's own study. It shares run.py's harness (one run at a
time, the machine and versions recorded, every number kept with the file it came from) and builds the report from
the run folders alone. README.md, section "The off-policy study", says what each experiment tests.

A study goes to a new folder, runs/study_{mode}_{date-time} unless --results_dir names one, and --resume goes on with
the newest of its mode there. Ctrl-C stops the study with its run in progress and prints the command that resumes it.
With --report_only it rebuilds the committed study, benchmark/study_results (a full one, copied there), or the one
in --results_dir.
"""

import glob
import json
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass

import tyro

import plots
from run import ROOT, cell, execute, load_runs, markdown, new_record, new_results_dir, per_run, render, run_in_turn
from run import table, write_json


@dataclass
class Args:
    results_dir: str | None = None
    """a new folder for results.md, results.json, the plots, raw/ and logs/; None: runs/study_{mode}_{time}"""
    cache_dir: str = ".cache"
    """the scripts' --cache_dir: each size's warm-started model is built there once and shared by every run"""
    quick: bool = False
    """a smaller study that finishes in under 15 minutes on 2 cores"""
    tiny: bool = False
    """seconds a run: checks that everything works (CI), measures nothing"""
    resume: bool = False
    """go on with an interrupted study in --results_dir (None: the newest runs/study_{mode}_*): its runs are kept"""
    report_only: bool = False
    """run nothing: rebuild the report from the runs in --results_dir/raw (by default benchmark/study_results/raw)"""


# ----------------------------------------------------------------------------------------------------
# What to run. Every run is the scripts' defaults (built-in task, k = 2, lr 1e-4, β 0.1) plus the mode's flags and
# its own. The losses are compared at the middle size; the sizes with online DPO; E and k at N = 1.
LOSSES = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT"}
SIZES = {"3m": "2.7 M", "10m": "10.6 M", "30m": "29.0 M"}
BASE_SIZE = "10m"
MODES = {
    "full": dict(seeds=[1, 2], steps=64, n=[1, 4, 16], sizes=["3m", "10m", "30m"], batch_size=32, flags=""),
    "quick": dict(
        seeds=[1], steps=24, n=[1, 8], sizes=["3m", "10m"], batch_size=32, flags="--eval_every 8 --eval_prompts 128"
    ),
    "tiny": dict(
        seeds=[1],
        steps=4,
        n=[1, 2],
        sizes=["3m", "10m"],
        batch_size=8,
        flags="--micro_batch_size 4 --eval_every 2 --eval_prompts 16 --sft_steps 30",
    ),
}


def setting(steps: int, loss="sigmoid", size=BASE_SIZE, n=1, updates=1, k=2) -> dict:
    """One setting of the study: its name (the runs' --exp_name) and its flags."""
    name = f"{loss}_{size}_N{n}_E{updates}_k{k}_steps{steps}"
    flags = f"--loss_type {loss} --model_size {size} --batches_per_round {n} --updates_per_batch {updates}"
    flags += f" --num_samples {k} --num_steps {steps}"
    return dict(name=name, loss=loss, size=size, n=n, updates=updates, k=k, steps=steps, flags=flags.split())


def plan(mode: dict) -> list[dict]:
    """The settings, then the runs, one seed at a time so that a slow spell of the machine hits every setting alike."""
    steps = mode["steps"]
    settings = [setting(steps, loss=loss, n=n) for loss in LOSSES for n in mode["n"]]
    settings += [setting(steps, size=size, n=n) for size in mode["sizes"] if size != BASE_SIZE for n in mode["n"]]
    settings += [setting(steps, updates=2), setting(steps // 2, k=4)]
    return [s | {"seed": seed} for seed in mode["seeds"] for s in settings]


def run_study(args: Args, mode_name: str):
    mode = MODES[mode_name]
    cache_dir = os.path.abspath(args.cache_dir)
    record = new_record(args.results_dir, mode_name, mode, "study.json", resume=args.resume)
    done = {(r["name"], r["seed"]) for r in record["runs"]}
    to_run = [run for run in plan(mode) if (run["name"], run["seed"]) not in done]
    if not to_run:
        print(f"nothing left to run: {args.results_dir}/raw/study.json lists every run; only the report is rebuilt")
        return

    # The warm-started model of each size with runs to do is built (or found in the cache) first, so that no run's
    # wall time includes it.
    for size in [size for size in mode["sizes"] if any(run["size"] == size for run in to_run)]:
        code = "import sys, tyro, async_online_dpo as A; A.warm_start(tyro.cli(A.Args, args=sys.argv[1:]))"
        flags = [*mode["flags"].split(), "--model_size", size, "--cache_dir", cache_dir]
        print(f"warm start: {size} ...", flush=True)
        execute([sys.executable, "-c", code, *flags], os.path.join(args.results_dir, "logs", f"warm_start_{size}.log"))

    def base_cmd(run: dict) -> list[str]:
        cmd = [sys.executable, os.path.join(ROOT, "sync_baseline.py"), "--batch_size", str(mode["batch_size"])]
        return [*cmd, *mode["flags"].split(), *run["flags"], "--cache_dir", cache_dir]

    run_in_turn(plan(mode), base_cmd, args.results_dir, record, "study.json")


# ----------------------------------------------------------------------------------------------------
# The report, from raw/ alone. Every number is a mean over seeds, kept in results.json with its values and sources.
def mean_lag(run: dict) -> float:
    return statistics.fmean(run["summary"]["lags"])


def logprob_gap(run: dict) -> float:
    """Mean per-token |log π_trainer - log π_sampler| over a run's steps (left out: NaN steps, every pair tied)."""
    return statistics.fmean(g for r in run["steps"] if not math.isnan(g := r["async/logprob_gap"]))


def curve_gold(run: dict) -> float:
    """Mean held-out gold reward over the evaluations after the start: how fast a run learns, per batch of prompts."""
    return statistics.fmean(e["eval/gold_reward"] for e in run["evals"][1:])


def cells(runs: list[dict]) -> dict:
    """What the tables can show of one setting (its runs, one a seed), by column."""
    row = {"seeds": ", ".join(str(r["seed"]) for r in runs)}
    for column, key, decimals in [
        ("SFT gold reward", "eval_gold_reward_start", 3),
        ("final gold reward", "eval_gold_reward_end", 3),
        ("final KL", "kl_end", 3),
        ("wall time (s)", "wall_time", 1),
        ("s/step", "time_per_step", 3),
    ]:
        row[column] = per_run(runs, [r["summary"][key] for r in runs], f"summary.json: {key}", decimals)
    row["mean lag (updates)"] = per_run(runs, [mean_lag(r) for r in runs], "summary.json: mean of lags", 2)
    source = "metrics.jsonl: mean of async/logprob_gap (NaN steps left out)"
    row["log-prob gap (per token)"] = per_run(runs, [logprob_gap(r) for r in runs], source, 4)
    source = "metrics.jsonl: mean of eval/gold_reward after version 0"
    row["mean gold over the run"] = per_run(runs, [curve_gold(r) for r in runs], source, 3)
    return row


def paired(runs: list[dict], reference: list[dict], fn, how: str, source: str, decimals: int = 3) -> dict:
    """fn(run, the reference run of the same seed), per seed that both have."""
    pairs = [(r, b) for r in runs for b in reference if b["seed"] == r["seed"]]
    values = [fn(r, b) for r, b in pairs]
    return cell(values, [f"{r['folder']} vs {b['folder']}: {source}" for r, b in pairs], decimals, how)


def gold(run: dict) -> float:
    return run["summary"]["eval_gold_reward_end"]


def retained(run: dict, on_policy: dict) -> float:
    """Share of the on-policy run's gain over the SFT policy that this run keeps: 1 = as good as N = 1, 0 = no gain."""
    sft = on_policy["summary"]["eval_gold_reward_start"]
    return (gold(run) - sft) / (gold(on_policy) - sft) if gold(on_policy) > sft else float("nan")


# A difference counts only beyond the noise: the larger std over seeds of the two (with one seed, any difference).
def noise(*entries: dict) -> float:
    return max((e["std"] for e in entries if e["std"] is not None), default=0.0)


def beyond(a: dict, b: dict) -> bool:
    """a's mean exceeds b's by more than the noise."""
    return a["mean"] - b["mean"] > noise(a, b)


def robustness(groups: dict, by_n: dict) -> dict:
    """For one loss or size, by_n {N: settings name}: each N's share of the N = 1 gain kept, and the fall in
    final gold reward from N = 1, per seed."""
    on_policy = groups[by_n[1]]
    out = {}
    for n, name in by_n.items():
        source = "summary.json: eval_gold_reward_end, eval_gold_reward_start"
        how = "(final gold - SFT gold) / (final gold of N = 1 - SFT gold), per seed"
        out[n] = {"retained": paired(groups[name], on_policy, retained, how, source)}
        how = "final gold of N = 1 - final gold of this N, per seed"
        out[n]["drop"] = paired(groups[name], on_policy, lambda r, b: gold(b) - gold(r), how, source)
    return out


def verdict(holds: bool, reasons: list[str]) -> str:
    return "holds here" if holds else "**does not hold at this scale** (" + "; ".join(reasons) + ")"


def make_report(results_dir: str):
    with open(os.path.join(results_dir, "raw", "study.json")) as f:
        record = json.load(f)
    mode = record["mode_config"]
    groups = load_runs(results_dir, record)
    settings = {s["name"]: s for s in plan(mode)}
    steps, ns, largest = mode["steps"], mode["n"], max(mode["n"])
    loss_n = {loss: {n: setting(steps, loss=loss, n=n)["name"] for n in ns} for loss in LOSSES}
    size_n = {size: {n: setting(steps, size=size, n=n)["name"] for n in ns} for size in mode["sizes"]}
    rows = {key: cells(runs) for key, runs in groups.items()}

    # Table 1: every setting.
    columns = ["setting", "loss", "size", "N", "E", "k", "updates", "seeds", "SFT gold reward", "final gold reward"]
    columns += ["final KL", "mean gold over the run", "mean lag (updates)", "log-prob gap (per token)"]
    columns += ["wall time (s)", "s/step"]
    every = []
    for key, s in settings.items():
        label = {"loss": LOSSES[s["loss"]], "size": SIZES[s["size"]], "N": str(s["n"]), "E": str(s["updates"])}
        label |= {"k": str(s["k"]), "updates": str(s["steps"] * s["updates"])}
        every.append((key, rows[key] | label))
    tables = [table("Table 4. Every setting", columns, every)]

    # Tables 2 and 3: robustness to the paper's N, by loss and by size.
    robust = {"loss": {x: robustness(groups, by_n) for x, by_n in loss_n.items()}}
    robust["size"] = {x: robustness(groups, by_n) for x, by_n in size_n.items()}
    for title, what, labels, by in [
        ("Table 1. Off-policy robustness by loss (size 10m)", "loss", LOSSES, loss_n),
        ("Table 2. Off-policy robustness of online DPO by policy size", "size", SIZES, size_n),
    ]:
        columns = [what, "seeds"] + [f"final gold, N = {n}" for n in ns] + [f"final KL, N = {n}" for n in ns]
        columns += [f"gold fall from N = 1 to {largest}", f"share of the N = 1 gain kept at N = {largest}"]
        entries = []
        for x, by_n in by.items():
            row = {"seeds": rows[by_n[1]]["seeds"]}
            row |= {f"final gold, N = {n}": rows[by_n[n]]["final gold reward"] for n in ns}
            row |= {f"final KL, N = {n}": rows[by_n[n]]["final KL"] for n in ns}
            row[f"gold fall from N = 1 to {largest}"] = robust[what][x][largest]["drop"]
            row[f"share of the N = 1 gain kept at N = {largest}"] = robust[what][x][largest]["retained"]
            entries.append((labels[x], row))
        tables.append(table(title, columns, entries))

    # Table 4: the compute optimizations against the N = 1 online DPO run.
    base, e2, k4_half = (setting(steps)["name"], setting(steps, updates=2)["name"], setting(steps // 2, k=4)["name"])
    columns = ["setting", "seeds", "updates", "completions sampled", "mean gold over the run", "final gold reward"]
    columns += ["final KL", "wall time (s)", "wall time against the baseline (×)"]
    compute = []
    for key, label in [
        (base, "baseline: k = 2, E = 1"),
        (e2, "E = 2 updates per batch"),
        (k4_half, "k = 4, half the batches"),
    ]:
        s = settings[key]
        row = rows[key] | {"updates": str(s["steps"] * s["updates"])}
        row["completions sampled"] = str(s["steps"] * mode["batch_size"] * s["k"])
        how = "wall time / the baseline's, per seed"
        ratio = paired(
            groups[key],
            groups[base],
            lambda r, b: r["summary"]["wall_time"] / b["summary"]["wall_time"],
            how,
            "summary.json: wall_time",
            2,
        )
        compute.append((label, row | {"wall time against the baseline (×)": ratio}))
    tables.append(table("Table 3. The compute optimizations (online DPO, size 10m, N = 1)", columns, compute))

    # The three claims. 1 and 2: robustness is the share of the on-policy (N = 1) gain over the SFT policy that the
    # largest N keeps; a loss or size that gains nothing on-policy cannot be compared.
    def more_robust(a: str, b: str, what: str, labels: dict) -> str | None:
        """None if a keeps more of its gain at the largest N than b, beyond the noise; else the reason it does not."""
        ra, rb = robust[what][a][largest]["retained"], robust[what][b][largest]["retained"]
        for x, r in ((a, ra), (b, rb)):
            if math.isnan(r["mean"]):
                return f"{labels[x]} gains nothing over the SFT policy at N = 1, so its share cannot be compared"
        if beyond(ra, rb):
            return None
        return f"{labels[a]} keeps {render(ra)} of its N = 1 gain at N = {largest}, {labels[b]} {render(rb)}"

    claims = []
    reasons = [r for loss in ("rloo", "best_of_k") if (r := more_robust("sigmoid", loss, "loss", LOSSES))]
    claims.append(("Online DPO is the most robust to off-policy data", verdict(not reasons, reasons)))
    pairs = zip(mode["sizes"][1:], mode["sizes"])
    reasons = [r for large, small in pairs if (r := more_robust(large, small, "size", SIZES))]
    claims.append(("Robustness grows with the policy's size", verdict(not reasons, reasons)))

    # 3. Faster: E = 2 learns more per batch of prompts, k = 4 needs half the batches and less wall time. At a cost:
    #    a higher KL (E = 2, k = 4), and for k = 4 no lower final reward than the baseline's beyond the noise.
    r_base, r_e2, r_k4 = rows[base], rows[e2], rows[k4_half]
    faster = {
        "E = 2 learns faster per batch of prompts": beyond(
            r_e2["mean gold over the run"], r_base["mean gold over the run"]
        ),
        "E = 2 ends at a higher KL": beyond(r_e2["final KL"], r_base["final KL"]),
        "k = 4 in half the batches ends as high": not beyond(r_base["final gold reward"], r_k4["final gold reward"]),
        "k = 4 in half the batches takes less wall time": r_k4["wall time (s)"]["mean"]
        < r_base["wall time (s)"]["mean"],
        "k = 4 in half the batches ends at a higher KL": beyond(r_k4["final KL"], r_base["final KL"]),
    }
    reasons = [f"not: {what}" for what, true in faster.items() if not true]
    claims.append(("The compute optimizations are faster but cost performance (KL)", verdict(not reasons, reasons)))

    # The paper's presentation: final gold against final KL, a marker per N, a panel per loss and per size.
    sft = {size: groups[by_n[1]][0]["summary"]["eval_gold_reward_start"] for size, by_n in size_n.items()}
    panels = [(LOSSES[x], {n: groups[name] for n, name in by_n.items()}, sft[BASE_SIZE]) for x, by_n in loss_n.items()]
    title = "Final gold reward against final KL across the paper's N, by loss (size 10m)"
    plots.frontier(os.path.join(results_dir, "losses.png"), panels, title)
    panels = [
        (f"online DPO, {SIZES[x]}", {n: groups[name] for n, name in by_n.items()}, sft[x]) for x, by_n in size_n.items()
    ]
    title = "Final gold reward against final KL across the paper's N, by policy size (online DPO)"
    plots.frontier(os.path.join(results_dir, "sizes.png"), panels, title)
    curves = {"E = 1 (baseline)": (groups[base], "tab:blue"), "E = 2": (groups[e2], "tab:orange")}
    plots.tradeoff(os.path.join(results_dir, "updates_per_batch.png"), curves, "Two updates per batch against one")
    curves = {"k = 2 (baseline)": (groups[base], "tab:blue"), "k = 4, half the batches": (groups[k4_half], "tab:green")}
    plots.tradeoff(os.path.join(results_dir, "num_samples.png"), curves, "Four samples per prompt against two")

    machine, packages = record["machine"], record["packages"]
    took = f" (took {record['seconds'] / 60:.1f} min)" if "seconds" in record else ""
    if record.get("resumed"):
        took += f", interrupted and resumed with `--resume` on {', '.join(record['resumed'])}"
    other = [r["other_cores"] for r in record["runs"]]
    claim_lines = "\n".join(f"{i}. {claim}: {v}." for i, (claim, v) in enumerate(claims, 1))
    text = f"""# The off-policy study

`{record["command"]}`, run {record["date"]}{took} on {machine["cores"]} cores ({machine["cpu"]}), \
{machine["ram_gib"]:.1f} GiB RAM, GPU: {machine["gpu"]}; torch {packages["torch"]}, vllm {packages["vllm"]}, \
transformers {packages["transformers"]}. Other processes kept {statistics.fmean(other):.2f} cores busy on average \
while the runs ran, at most {max(other):.2f} during one run (timings are fair only near 0).

Every run is `sync_baseline.py` with `--batch_size {mode["batch_size"]} {mode["flags"]}`, the paper's N as \
`--batches_per_round N` (one policy version samples N batches, trained on at lags 0 .. N - 1) and its own \
flags; seeds {", ".join(map(str, mode["seeds"]))}; ± is the standard deviation over seeds. README.md, section \
["The off-policy study"](../../README.md#the-off-policy-study), says what each experiment tests and how to read it.

## The paper's claims at this scale

A difference counts only beyond the noise: the larger standard deviation over seeds of the two numbers compared \
(with one seed, any difference counts).

{claim_lines}

{markdown(tables[1])}

![final gold reward against final KL by loss](losses.png)

{markdown(tables[2])}

![final gold reward against final KL by policy size](sizes.png)

{markdown(tables[3])}

![two updates per batch against one](updates_per_batch.png)

![four samples per prompt against two](num_samples.png)

{markdown(tables[0])}
"""
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(text)
    results = {"study": record, "claims": [{"claim": c, "verdict": v} for c, v in claims], "tables": tables}
    write_json(os.path.join(results_dir, "results.json"), results | {"checks": faster})
    print(f"wrote {os.path.join(results_dir, 'results.md')}")
    for claim, v in claims:
        print(f"- {claim}: {v}")


def newest_study(mode_name: str) -> str:
    """The folder of the newest study of this mode under runs/ (its name ends in the date and time it started)."""
    found = sorted(p for p in glob.glob(os.path.join("runs", f"study_{mode_name}_*")) if os.path.isdir(p))
    if not found:
        sys.exit(
            f"error: --resume found no {mode_name} study here (runs/study_{mode_name}_*); give its folder as "
            "--results_dir, or leave --resume out to start one."
        )
    return found[-1]


def resume_command(args: Args) -> str:
    """The command that goes on with this study where it stopped."""
    mode_flags = ["--quick"] * args.quick + ["--tiny"] * args.tiny
    cache = [] if args.cache_dir == Args.cache_dir else ["--cache_dir", args.cache_dir]
    return shlex.join(["python", sys.argv[0], *mode_flags, "--resume", "--results_dir", args.results_dir, *cache])


if __name__ == "__main__":
    args = tyro.cli(Args, description=__doc__, use_underscores=True)
    if args.quick and args.tiny:
        sys.exit("error: choose one of --quick and --tiny.")
    mode_name = "quick" if args.quick else "tiny" if args.tiny else "full"
    if args.report_only:
        args.results_dir = args.results_dir or os.path.join(ROOT, "benchmark", "study_results")
    else:
        if args.resume:
            args.results_dir = args.results_dir or newest_study(mode_name)
            print(f"resuming the study in {args.results_dir}", flush=True)
        else:
            args.results_dir = args.results_dir or new_results_dir("study", mode_name)
            print(f"writing the study to {args.results_dir}", flush=True)
        try:
            run_study(args, mode_name)
        except KeyboardInterrupt:
            sys.exit(f"interrupted: stopped the study and its run in progress; to go on: {resume_command(args)}")
    make_report(args.results_dir)
