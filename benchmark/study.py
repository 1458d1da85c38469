"""The paper's off-policy study on the built-in task: how much off-policy data each loss tolerates, at three
policy sizes, and what its two compute optimizations buy and cost, each claim judged by a rule fixed in advance.

    python benchmark/study.py                # full: 5 seeds, 64 updates a run, N in {1, 4} (5.5 h on 2 CPU cores)
    python benchmark/study.py --quick        # 1 seed, 32 updates, N in {1, 2}, sizes 3m, 10m: directions only (18 min)
    python benchmark/study.py --tiny         # seconds a run, for CI (tests/test_study.py)
    python benchmark/study.py --resume       # go on with an interrupted study: its finished runs are kept
    python benchmark/study.py --report_only  # rebuild results.md, results.json and the plots from raw/

Every run of the off-policy study is sync_baseline.py with the paper's N (--batches_per_round N): one policy version
samples N batches, trained on at lags 0 .. N - 1, as in the paper's own study. The study runs in three stages, each
decided by the finished runs of the stages before it: (1) each size's warm start, (2) each size's learning rate,
from on-policy runs alone, (3) everything else. It shares run.py's harness (one run at a time, the machine and
versions recorded, every number kept with the file it came from) and builds the report from the run folders alone.
docs/study.md states the decision rule and what each experiment tests.

A study goes to a new folder, runs/study_{mode}_{date-time} unless --results_dir names one, and --resume goes on with
the newest of its mode there. Ctrl-C stops the study with its run in progress and prints the command that resumes it.
With --report_only it rebuilds the committed study, benchmark/study_results (a full one, copied there), or the one
in --results_dir.
"""

import collections
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
from run import ROOT, cell, execute, load_runs, markdown, new_record, new_results_dir, per_run, run_in_turn
from run import table, write_json


@dataclass
class Args:
    results_dir: str | None = None
    """a new folder for results.md, results.json, the plots, raw/ and logs/; None: runs/study_{mode}_{time}"""
    cache_dir: str = ".cache"
    """the scripts' --cache_dir: each size's warm-started model is built there once and shared by every run"""
    quick: bool = False
    """a smaller study (under 20 minutes on 2 cores): one seed, so it shows directions, not verdicts"""
    tiny: bool = False
    """seconds a run: checks that everything works (CI), measures nothing"""
    resume: bool = False
    """go on with an interrupted study in --results_dir (None: the newest runs/study_{mode}_*): its runs are kept"""
    report_only: bool = False
    """run nothing: rebuild the report from the runs in --results_dir/raw (by default benchmark/study_results/raw)"""


# ----------------------------------------------------------------------------------------------------
# What to run. Every run is the scripts' defaults (built-in task, k = 2, β 0.1) plus the mode's flags and its own.
# The losses are compared at the middle size and the default learning rate, as the paper compares them at one rate;
# the sizes with online DPO, each at the warm start and learning rate its stage chose; E and k at N = 1.
LOSSES = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT"}
SIZES = {"3m": "2.7 M", "10m": "10.6 M", "30m": "29.0 M"}  # smallest first
BASE_SIZE = "10m"
LR, SFT_STEPS = 1e-4, 30  # the scripts' --learning_rate and --sft_steps: the default run's, kept for the middle size
MARGIN = 0.03  # the smallest difference in final gold reward that matters here; the seeds are chosen to resolve it
MODES = {
    "full": dict(
        seeds=[1, 2, 3, 4, 5],
        steps=64,
        n=[1, 4],  # 16 rounds at N = 4, as in the paper's 256 updates at its largest N, 16
        sizes=["3m", "10m", "30m"],
        batch_size=32,
        flags="--eval_every 16 --eval_every_at_end 4",
        sft_steps=[30, 60, 120],
        lrs=[5e-5, 1e-4, 2e-4],
        lr_seeds=[1, 2],
        bound=dict(steps=12, seeds=[1, 2, 3], eval_prompts=256),
        default_check=dict(seeds=[1, 2]),
    ),
    "quick": dict(
        seeds=[1],
        steps=32,
        n=[1, 2],  # 16 rounds at N = 2
        sizes=["3m", "10m"],
        batch_size=32,
        flags="--eval_every 8 --eval_every_at_end 4 --eval_prompts 128",
        sft_steps=[SFT_STEPS],
        lrs=[LR],
        lr_seeds=[1],
        bound=dict(steps=8, seeds=[1], eval_prompts=256),
    ),
    "tiny": dict(
        seeds=[1],
        steps=4,
        n=[1, 2],
        sizes=["3m", "10m"],
        batch_size=8,
        flags="--micro_batch_size 4 --eval_every 2 --eval_every_at_end 1 --eval_prompts 16",
        sft_steps=[SFT_STEPS],
        lrs=[LR],  # the stages' rules are tested without runs (tests/test_study.py): each run here costs 20 s of CI
        lr_seeds=[1],  # no generation-bound pair either: --quick runs it (each run here costs CI 20 s)
    ),
}


def setting(steps: int, loss="sigmoid", size=BASE_SIZE, n=1, updates=1, k=2, lr=LR, sft=SFT_STEPS) -> dict:
    """One setting of the study's sync runs: its name (the runs' --exp_name) and its flags."""
    name = f"{loss}_{size}" + (f"_sft{sft}" if sft != SFT_STEPS else "") + (f"_lr{lr:g}" if lr != LR else "")
    name += f"_N{n}_E{updates}_k{k}_steps{steps}"
    flags = f"--loss_type {loss} --model_size {size} --batches_per_round {n} --updates_per_batch {updates}"
    flags += f" --num_samples {k} --num_steps {steps} --learning_rate {lr:g} --sft_steps {sft}"
    s = dict(name=name, loss=loss, size=size, n=n, updates=updates, k=k, steps=steps, lr=lr, sft=sft, script="sync")
    return s | {"flags": flags.split()}


def probe(size: str, sft: int) -> dict:
    """Stage 1: one update from a warm start of `sft` SFT steps, for the SFT gold reward (version 0's evaluation)."""
    return setting(1, size=size, sft=sft) | {"name": f"probe_{size}_sft{sft}", "seed": 1}


def bound_setting(mode: dict, updates: int) -> dict:
    """Meant to make generation the bottleneck: the async script, its generator also evaluating eval_prompts held-out
    prompts at every version. More samples per prompt do not do it on a CPU: the trainer scores every completion and
    takes the reference's log-probs of each, so T grows with k as G does (k = 16: G 2.2 s, T 5.6 s a step). This does
    not either on the CPUs measured (G 2.5 s, T 3.7 s: the trainer measures each evaluation's KL); claim 3c is judged
    only where G > T is measured."""
    b = mode["bound"]
    name = f"bound_sigmoid_{BASE_SIZE}_E{updates}_eval{b['eval_prompts']}_steps{b['steps']}"
    flags = f"--updates_per_batch {updates} --num_steps {b['steps']} --eval_every 1 --eval_every_at_end 0"
    flags += f" --eval_prompts {b['eval_prompts']}"
    return dict(name=name, updates=updates, k=2, steps=b["steps"], script="async", flags=flags.split())


def default_check(k: int) -> dict:
    """The default run as a user starts it (async, 128 batches of 64 prompts, k = 2), or with k = 4 in half the
    batches: only these flags, none of the study's."""
    steps = 128 * 2 // k
    flags = ["--num_samples", str(k), "--num_steps", str(steps)]
    return dict(name=f"default_k{k}_steps{steps}", k=k, steps=steps, script="default", flags=flags)


def sizes_in_order(mode: dict) -> list[str]:
    return [size for size in SIZES if size in mode["sizes"]]


def sft_gold(groups: dict, name: str) -> float | None:
    return groups[name][0]["evals"][0]["eval/gold_reward"] if name in groups else None


def choose_sft(mode: dict, groups: dict) -> dict:
    """Stage 1's rule. {size: SFT steps, or None where no value of the grid works}; a size not yet decided is missing.
    The middle size keeps the default run's warm start, a smaller size gets the grid's first value, and a larger size
    the fewest SFT steps of the grid under which it starts (SFT gold reward) at least as high as the next smaller."""
    grid, sizes = mode.get("sft_steps", [SFT_STEPS]), sizes_in_order(mode)
    base = sizes.index(BASE_SIZE)
    chosen = {size: grid[0] for size in sizes[:base]} | {BASE_SIZE: SFT_STEPS}
    if len(grid) == 1:  # nothing to choose: the one value, whether a larger size then starts as high or not
        return chosen | {size: grid[0] for size in sizes[base + 1 :]}
    for smaller, size in zip(sizes[base:], sizes[base + 1 :]):
        if smaller not in chosen:
            break
        if chosen[smaller] is None:
            chosen[size] = None
            continue
        floor = sft_gold(groups, probe(smaller, chosen[smaller])["name"])
        for sft in grid:
            start = sft_gold(groups, probe(size, sft)["name"])
            if floor is None or start is None:
                return chosen  # a probe still to run
            if start >= floor:
                chosen[size] = sft
                break
        else:
            chosen[size] = None
    return chosen


def lr_seeds(mode: dict) -> list[int]:
    return mode.get("lr_seeds", mode["seeds"])


def choose_lr(mode: dict, groups: dict, sft: dict) -> dict:
    """Stage 2's rule, from on-policy (N = 1) runs alone: each size's learning rate is the grid's value with the best
    mean final gold reward over mode["lr_seeds"]. {size: rate}; a size not yet decided is missing."""
    lrs, chosen = mode.get("lrs", [LR]), {}
    for size in sizes_in_order(mode):
        if sft.get(size) is None:
            continue
        if len(lrs) == 1:
            chosen[size] = lrs[0]
            continue
        grid = {lr: groups.get(setting(mode["steps"], size=size, lr=lr, sft=sft[size])["name"], []) for lr in lrs}
        grid = {lr: [r for r in runs if r["seed"] in lr_seeds(mode)] for lr, runs in grid.items()}
        if all(len(runs) == len(lr_seeds(mode)) for runs in grid.values()):
            chosen[size] = max(lrs, key=lambda lr: statistics.fmean(final_gold(r) for r in grid[lr]))
    return chosen


def plan(mode: dict, groups: dict) -> list[dict]:
    """The runs that the finished ones (groups) decide, in the order to run them: stage 1's probes until every size's
    warm start is chosen, then stage 2's learning-rate grid until every rate is, then the rest, one seed at a time so
    that a slow spell of the machine hits every setting alike. A study runs these, then plans again."""
    steps, sizes, grid = mode["steps"], sizes_in_order(mode), mode.get("sft_steps", [SFT_STEPS])
    sft = choose_sft(mode, groups)
    runs = []
    if len(grid) > 1:
        base = sizes.index(BASE_SIZE)
        for smaller, size in zip(sizes[base:], sizes[base + 1 :]):
            if sft.get(smaller) is None:
                break
            runs.append(probe(smaller, sft[smaller]))
            for value in grid:  # in order, up to the one chosen, or to the first still to run
                runs.append(probe(size, value))
                if sft.get(size) == value or probe(size, value)["name"] not in groups:
                    break
    if any(size not in sft for size in sizes):
        return runs
    lrs = mode.get("lrs", [LR])
    if len(lrs) > 1:
        grid_runs = [setting(steps, size=s, lr=lr, sft=sft[s]) for s in sizes if sft[s] is not None for lr in lrs]
        runs += [g | {"seed": seed} for seed in lr_seeds(mode) for g in grid_runs]
    lr = choose_lr(mode, groups, sft)
    if any(sft[size] is not None and size not in lr for size in sizes):
        return runs
    settings = [setting(steps, loss=loss, n=n) for loss in LOSSES for n in mode["n"]]
    settings += [setting(steps, size=s, n=n, lr=lr[s], sft=sft[s]) for s in sizes if s in lr for n in mode["n"]]
    settings += [setting(steps, updates=2), setting(steps // 2, k=4)]
    runs += [s | {"seed": seed} for seed in mode["seeds"] for s in settings]
    if "bound" in mode:
        runs += [bound_setting(mode, e) | {"seed": seed} for seed in mode["bound"]["seeds"] for e in (1, 2)]
    if "default_check" in mode:
        runs += [default_check(k) | {"seed": seed} for seed in mode["default_check"]["seeds"] for k in (2, 4)]
    return unique(runs)


def unique(runs: list[dict]) -> list[dict]:
    """Each run (name and seed) once, where first planned: the grid's on-policy runs are also stage 3's."""
    seen, out = set(), []
    for run in runs:
        if (run["name"], run["seed"]) not in seen:
            seen.add((run["name"], run["seed"]))
            out.append(run)
    return out


def run_study(args: Args, mode_name: str):
    mode = MODES[mode_name]
    cache_dir = os.path.abspath(args.cache_dir)
    record = new_record(args.results_dir, mode_name, mode, "study.json", resume=args.resume)

    def base_cmd(run: dict) -> list[str]:
        if run["script"] == "default":  # the default run as a user starts it, with its own flags alone
            return [sys.executable, os.path.join(ROOT, "async_online_dpo.py"), *run["flags"], "--cache_dir", cache_dir]
        script = "sync_baseline.py" if run["script"] == "sync" else "async_online_dpo.py"
        cmd = [sys.executable, os.path.join(ROOT, script), "--batch_size", str(mode["batch_size"])]
        return [*cmd, *mode["flags"].split(), *run["flags"], "--cache_dir", cache_dir]  # the run's flags win

    built, ran = set(), False
    while True:
        done = {(r["name"], r["seed"]) for r in record["runs"]}
        to_run = [
            run for run in plan(mode, load_groups(args.results_dir, record)) if (run["name"], run["seed"]) not in done
        ]
        if not to_run:
            break
        # The warm starts these runs need are built (or found in the cache) first, so that no run's wall time
        # includes one.
        for size, sft in sorted({(r.get("size", BASE_SIZE), r.get("sft", SFT_STEPS)) for r in to_run} - built):
            code = "import sys, tyro, async_online_dpo as A; A.warm_start(tyro.cli(A.Args, args=sys.argv[1:]))"
            flags = ["--model_size", size, "--sft_steps", str(sft), "--cache_dir", cache_dir]
            print(f"warm start: {size}, {sft} SFT steps ...", flush=True)
            execute(
                [sys.executable, "-c", code, *flags],
                os.path.join(args.results_dir, "logs", f"warm_start_{size}_sft{sft}.log"),
            )
            built.add((size, sft))
        run_in_turn(to_run, base_cmd, args.results_dir, record, "study.json")
        ran = True
    if not ran:
        print(f"nothing left to run: {args.results_dir}/raw/study.json lists every run; only the report is rebuilt")


# ----------------------------------------------------------------------------------------------------
# What one run shows. Its final gold reward and KL are the means over its final evaluations, those after version
# num_steps - eval_every (every --eval_every_at_end versions there): one evaluation moves by about 0.01 between
# neighbouring versions, and a mean of several is steadier than the last alone.
def final_evals(run: dict) -> list[dict]:
    return [e for e in run["evals"] if e["eval/version"] > run["args"]["num_steps"] - run["args"]["eval_every"]]


def final_gold(run: dict) -> float:
    return statistics.fmean(e["eval/gold_reward"] for e in final_evals(run))


def final_kl(run: dict) -> float:
    return statistics.fmean(e["eval/kl"] for e in final_evals(run))


def sft(run: dict) -> float:
    return run["evals"][0]["eval/gold_reward"]


def curve_gold(run: dict) -> float:
    """Mean held-out gold reward over the evaluations after version 0: how well a run does per batch of prompts."""
    return statistics.fmean(e["eval/gold_reward"] for e in run["evals"][1:])


def kl_at(run: dict, gold: float) -> float:
    """The KL at which the run first reaches this gold reward along its evaluations, linear between two."""
    for before, e in zip(run["evals"], run["evals"][1:]):
        if e["eval/gold_reward"] >= gold:
            lo, hi = before["eval/gold_reward"], e["eval/gold_reward"]
            w = min(1.0, max(0.0, (gold - lo) / (hi - lo))) if hi > lo else 1.0
            return before["eval/kl"] + w * (e["eval/kl"] - before["eval/kl"])
    return float("nan")


def logprob_gap(run: dict) -> float:
    """Mean per-token |log π_trainer - log π_sampler| over a run's steps (left out: NaN steps, every pair tied)."""
    return statistics.fmean(g for r in run["steps"] if not math.isnan(g := r["async/logprob_gap"]))


def summary(key: str):
    return lambda run: run["summary"][key]


GOLD = "metrics.jsonl: mean eval/gold_reward of the final evaluations"
KL = "metrics.jsonl: mean eval/kl of the final evaluations"


# ----------------------------------------------------------------------------------------------------
# The decision rule (docs/study.md, "How the study decides"). Every comparison is paired by seed: per seed a difference
# d, and over the seeds its mean and 95% Student t interval, mean ± t(n - 1) · sd / √n. A claim that d > 0 holds if
# the interval lies above 0, is reversed if it lies below 0, and is undecided otherwise (d < 0 alike). A claim of "as
# high" (d ≥ -MARGIN) holds if the interval lies above -MARGIN and is reversed if it lies below. One seed gives no
# interval: its difference is a direction, never a verdict.
T_975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131]


def t_975(dof: int) -> float:
    """Student's t two-sided 95% quantile for dof degrees of freedom (the table; tests/test_study.py checks it)."""
    return T_975[dof - 1] if dof <= len(T_975) else 1.96 + 2.5 / dof


def decide(values: list[float], claim: str, gold: bool) -> dict:
    """The rule, for one comparison's per-seed differences. claim: ">" (d > 0), "<" (d < 0), ">=" (d ≥ -MARGIN).
    For a difference in final gold reward, also the seeds that would resolve MARGIN at this spread."""
    if len(values) < 2 or any(math.isnan(v) for v in values):
        return dict(claim=claim, low=None, high=None, outcome="undecided", seeds_for_margin=None)
    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    low, high = mean - t_975(n - 1) * sd / math.sqrt(n), mean + t_975(n - 1) * sd / math.sqrt(n)
    bar = -MARGIN if claim == ">=" else 0.0
    if claim == "<":
        outcome = "holds" if high < 0 else "reversed" if low > 0 else "undecided"
    else:
        outcome = "holds" if low > bar else "reversed" if high < bar else "undecided"
    needed = next(m for m in range(2, 1000) if t_975(m - 1) * sd / math.sqrt(m) <= MARGIN or m == 999) if gold else None
    return dict(claim=claim, low=low, high=high, outcome=outcome, seeds_for_margin=needed)


def paired(runs: list[dict], reference: list[dict], diff, how: str, source: str, claim: str, decimals=3) -> dict:
    """diff(run, the reference run of the same seed), per seed that both have, and what the rule makes of it."""
    pairs = [(r, b) for r in runs for b in reference if b["seed"] == r["seed"]]
    values = [diff(r, b) for r, b in pairs]
    sources = [f"{r['folder']} vs {b['folder']}: {source}" for r, b in pairs]
    return cell(values, sources, decimals, how) | decide(values, claim, gold=source == GOLD)


def machine_text(m: dict, ram=False) -> str:
    """A machine as the report names it; without its RAM, what a wall-time comparison must share."""
    return f"{m['cores']} cores ({m['cpu']}), " + (f"{m['ram_gib']:.1f} GiB RAM, " if ram else "") + f"GPU: {m['gpu']}"


def across_machines(runs: list[dict], reference: list[dict]) -> list[str]:
    """Why a wall-time comparison is not tested here: a seed whose two runs ran on different machines (a resumed study
    can go on on another one), or nothing."""
    seeds = [
        r["seed"]
        for r in runs
        for b in reference
        if b["seed"] == r["seed"] and machine_text(r["machine"]) != machine_text(b["machine"])
    ]
    return [f"seed {', '.join(map(str, seeds))}: the pair's two runs ran on different machines"] if seeds else []


def of(fn):
    """diff for paired(): fn(run) - fn(reference run)."""
    return lambda r, b: fn(r) - fn(b)


def interval(test: dict) -> str:
    """A paired difference as the tables and verdicts show it: its mean and interval, or one seed's direction."""
    d = test["decimals"]
    if test["low"] is None:
        return f"{test['mean']:+.{d}f} (one seed: a direction only)"
    return f"{test['mean']:+.{d}f} [{test['low']:+.{d}f}, {test['high']:+.{d}f}]"


def combine(outcomes: list[str]) -> str:
    """A claim made of several comparisons holds if all hold, is reversed if any is, and is undecided otherwise."""
    return "holds" if all(o == "holds" for o in outcomes) else "reversed" if "reversed" in outcomes else "undecided"


# ----------------------------------------------------------------------------------------------------
# The report, from raw/ alone. Every number is a mean over seeds, kept in results.json with its values and sources.
def cells(runs: list[dict]) -> dict:
    """What the tables can show of one setting (its runs, one a seed), by column."""
    row = {"seeds": ", ".join(str(r["seed"]) for r in runs)}
    for column, fn, source, decimals in [
        ("SFT gold reward", sft, "metrics.jsonl: eval/gold_reward at version 0", 3),
        ("final gold reward", final_gold, GOLD, 3),
        ("final KL", final_kl, KL, 3),
        ("mean gold over the run", curve_gold, "metrics.jsonl: mean eval/gold_reward after version 0", 3),
        ("mean lag (updates)", lambda r: statistics.fmean(r["summary"]["lags"]), "summary.json: mean of lags", 2),
        ("log-prob gap (per token)", logprob_gap, "metrics.jsonl: mean of async/logprob_gap (NaN steps left out)", 4),
        ("wall time (s)", summary("wall_time"), "summary.json: wall_time", 1),
        ("s/step", summary("time_per_step"), "summary.json: time_per_step", 3),
        ("G (s/step)", summary("generate_per_step"), "summary.json: generate_per_step", 3),
        ("T (s/step)", summary("train_per_step"), "summary.json: train_per_step", 3),
    ]:
        row[column] = per_run(runs, [fn(r) for r in runs], source, decimals)
    return row


def drop(by_n: dict, n: int) -> dict:
    """Per seed, the final gold reward at N = 1 minus that at N: how much the off-policy data costs."""
    how = "final gold at N = 1 - final gold at this N, per seed"
    return paired(by_n[1], by_n[n], of(final_gold), how, GOLD, ">")


def drop_difference(more: dict, less: dict, largest: int, how: str) -> dict:
    """Per seed, more's drop minus less's (more, less: {N: runs}): above 0 when `less` loses less to off-policy data."""

    def drops(by_n):
        at = {r["seed"]: r for r in by_n[largest]}
        return {r["seed"]: final_gold(r) - final_gold(at[r["seed"]]) for r in by_n[1] if r["seed"] in at}

    a, b = drops(more), drops(less)
    seeds = sorted(set(a) & set(b))
    values = [a[s] - b[s] for s in seeds]
    folders = {
        s: [r["folder"] for runs in (more[1], more[largest], less[1], less[largest]) for r in runs if r["seed"] == s]
        for s in seeds
    }
    sources = [f"{', '.join(folders[s])}: {GOLD}" for s in seeds]
    return cell(values, sources, 3, how) | decide(values, ">", gold=True)


@dataclass
class Study:
    """A finished study as the report reads it: its record, its runs by setting (with each run's args.json), each
    setting's table cells, what stages 1 and 2 chose, and the runs by N of each loss and each size."""

    results_dir: str
    record: dict
    mode: dict
    groups: dict
    rows: dict
    sft: dict
    lr: dict
    by_loss: dict
    by_size: dict

    def setting(self, **kw) -> list[dict]:
        return self.groups[setting(self.mode["steps"], **kw)["name"]]

    def row(self, runs: list[dict]) -> dict:
        """The table cells of the setting these runs are (each run's --exp_name is its setting's name)."""
        return self.rows[runs[0]["args"]["exp_name"]]


def load_groups(results_dir: str, record: dict) -> dict:
    """The finished runs by setting, as run.py loads them, each with its args.json."""
    groups = load_runs(results_dir, record)
    for runs in groups.values():
        for run in runs:
            with open(os.path.join(results_dir, run["folder"], "args.json")) as f:
                run["args"] = json.load(f)
    return groups


def load_study(results_dir: str) -> Study:
    with open(os.path.join(results_dir, "raw", "study.json")) as f:
        record = json.load(f)
    mode, groups = record["mode_config"], load_groups(results_dir, record)
    steps, ns = mode["steps"], mode["n"]
    sft_of = choose_sft(mode, groups)
    lr = choose_lr(mode, groups, sft_of)
    by_loss = {loss: {n: groups[setting(steps, loss=loss, n=n)["name"]] for n in ns} for loss in LOSSES}
    by_size = {
        s: {n: groups[setting(steps, size=s, n=n, lr=lr[s], sft=sft_of[s])["name"]] for n in ns}
        for s in sizes_in_order(mode)
        if s in lr
    }
    rows = {key: cells(runs) for key, runs in groups.items()}
    return Study(results_dir, record, mode, groups, rows, sft_of, lr, by_loss, by_size)


def stage_table(st: Study) -> dict:
    """Table 1: stages 1 and 2, each size's warm start and learning rate as the rules chose them."""
    grid, lrs = st.mode.get("sft_steps", [SFT_STEPS]), st.mode.get("lrs", [LR])
    grid = grid if len(grid) > 1 else []  # a grid of one value has no probes
    entries = []
    for size in sizes_in_order(st.mode):
        row = {"SFT steps (stage 1)": "none of the grid" if st.sft[size] is None else str(st.sft[size])}
        for value in grid:
            name = probe(size, value)["name"]
            if name in st.groups:
                source = "metrics.jsonl: eval/gold_reward at version 0"
                row[f"SFT gold, {value} SFT steps"] = per_run(st.groups[name], [sft_gold(st.groups, name)], source, 3)
        if size in st.lr:
            row["SFT gold reward"] = st.row(st.by_size[size][1])["SFT gold reward"]
            row["learning rate (stage 2)"] = f"{st.lr[size]:g}"
            for x in lrs:
                runs = [r for r in st.setting(size=size, lr=x, sft=st.sft[size]) if r["seed"] in lr_seeds(st.mode)]
                row[f"final gold at N = 1, lr {x:g}"] = per_run(runs, [final_gold(r) for r in runs], GOLD, 3)
        entries.append((SIZES[size], row))
    columns = ["size", "SFT steps (stage 1)", *[f"SFT gold, {v} SFT steps" for v in grid], "SFT gold reward"]
    columns += ["learning rate (stage 2)"] + [f"final gold at N = 1, lr {x:g}" for x in lrs]
    return table("Table 1. Stages 1 and 2: each size's warm start and learning rate", columns, entries)


def robustness_table(st: Study, title: str, what: str, labels: dict, by: dict) -> dict:
    """Tables 2 and 3: each N's final gold and KL, the paired drop from N = 1 with its interval, the on-policy gain
    beside it, and how far off-policy the batches were (the log-prob gap)."""
    ns = st.mode["n"]
    columns = [what, "seeds", "SFT gold reward", "on-policy gain (final gold at N = 1 - SFT gold)"]
    columns += [f"final gold, N = {n}" for n in ns] + [f"final KL, N = {n}" for n in ns]
    columns += [f"drop from N = 1 to {n} [95% interval]" for n in ns[1:]]
    columns += [f"log-prob gap per token, N = {n}" for n in ns[1:]]
    entries = []
    for x, by_n in by.items():
        on_policy = st.row(by_n[1])
        row = {"seeds": on_policy["seeds"], "SFT gold reward": on_policy["SFT gold reward"]}
        gains = [final_gold(r) - sft(r) for r in by_n[1]]
        row["on-policy gain (final gold at N = 1 - SFT gold)"] = per_run(by_n[1], gains, GOLD, 3)
        row |= {f"final gold, N = {n}": st.row(by_n[n])["final gold reward"] for n in ns}
        row |= {f"final KL, N = {n}": st.row(by_n[n])["final KL"] for n in ns}
        for n in ns[1:]:
            test = drop(by_n, n)
            row[f"drop from N = 1 to {n} [95% interval]"] = test | {"shown": interval(test)}
            row[f"log-prob gap per token, N = {n}"] = st.row(by_n[n])["log-prob gap (per token)"]
        entries.append((labels[x], row))
    return table(title, columns, entries)


def loss_claims(st: Study) -> list[dict]:
    """Claim 1 (Fig. 4): online DPO loses less to off-policy data than each other loss, from N = 1 to the largest N."""
    largest, subs = max(st.mode["n"]), []
    for letter, other in (("a", "rloo"), ("b", "best_of_k")):
        how = f"per seed, {LOSSES[other]}'s drop from N = 1 to {largest} - online DPO's"
        test = drop_difference(st.by_loss[other], st.by_loss["sigmoid"], largest, how)
        text = f"online DPO loses less than {LOSSES[other]} from N = 1 to {largest}"
        subs.append(judged(f"1{letter}", "Fig. 4", text, test))
    return [overall("1", "Fig. 4", "Online DPO is the most robust to off-policy data", subs), *subs]


def size_claims(st: Study) -> list[dict]:
    """Claim 2 (Fig. 5): a larger policy loses less, judged only on a size axis that is one: each larger size starts at
    least as high, and ends higher on-policy (its paired interval above 0)."""
    largest, sizes, subs, reasons, axis = max(st.mode["n"]), sizes_in_order(st.mode), [], [], []
    for letter, (small, large) in zip("abc", zip(sizes, sizes[1:])):
        if small not in st.by_size or large not in st.by_size:
            missing = large if small in st.by_size else small
            reasons.append(
                f"no warm start of the grid lets the {SIZES[missing]} policy start as high as the next smaller"
            )
            continue
        s1, l1 = st.by_size[small][1], st.by_size[large][1]
        if sft(l1[0]) < sft(s1[0]):
            reasons.append(
                f"the {SIZES[large]} policy starts below the {SIZES[small]} one (SFT gold {sft(l1[0]):.3f} against "
                f"{sft(s1[0]):.3f})"
            )
        rises = paired(
            l1, s1, of(final_gold), f"per seed, final gold at N = 1: {SIZES[large]} - {SIZES[small]}", GOLD, ">"
        )
        if rises["outcome"] != "holds" and not (rises["low"] is None and rises["mean"] > 0):  # one seed: its sign
            reasons.append(
                f"on-policy, the {SIZES[large]} policy does not end higher than the {SIZES[small]} one by the rule "
                f"({interval(rises)})"
            )
        axis.append(rises | {"text": f"{SIZES[large]} starts at {sft(l1[0]):.3f} against {sft(s1[0]):.3f}"})
        how = f"per seed, the {SIZES[small]} policy's drop from N = 1 to {largest} - the {SIZES[large]} one's"
        test = drop_difference(st.by_size[small], st.by_size[large], largest, how)
        text = f"{SIZES[large]} loses less than {SIZES[small]} from N = 1 to {largest}"
        subs.append(judged(f"2{letter}", "Fig. 5", text, test))
    claim = overall("2", "Fig. 5", "Robustness grows with the policy's size", subs, reasons)
    if not reasons:  # what makes it a size axis, shown beside the verdict: the starts and the on-policy rises
        claim["axis"] = axis
    return [claim, *([] if reasons else subs)]


def compute_claims(st: Study) -> list[dict]:
    """Claims 3 (Fig. 7) and 4 (Fig. 8): the compute optimizations at N = 1 and the middle size, against k = 2, E = 1,
    each sub-claim on its own."""
    steps = st.mode["steps"]
    base, e2, k4 = st.setting(), st.setting(updates=2), st.groups[setting(steps // 2, k=4)["name"]]

    def kl_at_lower_gold(r, b):
        gold = min(final_gold(r), final_gold(b))
        return kl_at(r, gold) - kl_at(b, gold)

    how = "per seed, mean gold over the run's evaluations: E = 2 - E = 1"
    test = paired(e2, base, of(curve_gold), how, "metrics.jsonl: mean eval/gold_reward after version 0", ">")
    out = [judged("3a", "Fig. 7", "E = 2 has a higher gold reward than E = 1 at an equal number of batches", test)]
    how = "per seed, the KL at which each run first reaches the lower of the two final golds: E = 2 - E = 1"
    test = paired(e2, base, kl_at_lower_gold, how, "metrics.jsonl: eval/gold_reward, eval/kl", ">")
    out.append(judged("3b", "Fig. 7", "E = 2 reaches a given gold reward at a higher KL than E = 1", test))
    text = "where generation is the bottleneck, the second update costs less wall time than a trainer step"
    if "bound" not in st.mode:
        out.append(judged("3c", "Fig. 7", text, None, ["this mode has no generation-bound setting"]))
    else:
        b1, b2 = st.groups[bound_setting(st.mode, 1)["name"]], st.groups[bound_setting(st.mode, 2)["name"]]
        g = statistics.fmean(r["summary"]["generate_per_step"] for r in b1)
        t = statistics.fmean(r["summary"]["train_per_step"] for r in b1)

        def extra_over_t(r, b):
            return r["summary"]["time_per_step"] - b["summary"]["time_per_step"] - b["summary"]["train_per_step"]

        how = "per seed, s/step of E = 2 - s/step of E = 1 - T of E = 1"
        test = paired(b2, b1, extra_over_t, how, "summary.json: time_per_step, train_per_step", "<")
        reasons = [] if g > t else [f"the setting meant to be generation-bound is not: G {g:.2f} s against T {t:.2f} s"]
        reasons += across_machines(b2, b1)
        out.append(judged("3c", "Fig. 7", text, test, reasons))

    test = paired(k4, base, of(final_gold), "per seed, final gold: k = 4 - k = 2", GOLD, ">=")
    out.append(judged("4a", "Fig. 8", f"k = 4 in half the batches ends as high (within {MARGIN})", test))
    how = "per seed, wall time: k = 4 - k = 2 (seconds)"
    test = paired(k4, base, of(summary("wall_time")), how, "summary.json: wall_time", "<", 1)
    out.append(
        judged("4b", "Fig. 8", "k = 4 in half the batches takes less wall time", test, across_machines(k4, base))
    )
    test = paired(k4, base, of(final_kl), "per seed, final KL: k = 4 - k = 2", KL, ">")
    out.append(judged("4c", "Fig. 8", "k = 4 in half the batches ends at a higher KL", test))
    return out


def drift_table(st: Study, number: int) -> dict:
    """Neighbouring sizes at their closest drift: of each size's online DPO settings with runs at N = 1 and the largest
    N (its warm start, any learning rate of the grid), the pair whose log-prob gaps per token at the largest N are
    closest. Claim 2 compares sizes at equal N; a larger rate moves a policy further per round, so this tells a smaller
    drop at equal N from one at equal off-policyness. Added after the full study's runs were seen: it describes, and
    no verdict rests on it."""
    largest, steps = max(st.mode["n"]), st.mode["steps"]
    sizes = [s for s in sizes_in_order(st.mode) if s in st.by_size]
    gap = lambda by_n: statistics.fmean(logprob_gap(r) for r in by_n[largest])  # noqa: E731
    columns = ["sizes", "learning rates"]
    columns += [f"log-prob gap per token at N = {largest}, {which} size" for which in ("smaller", "larger")]
    columns += [f"drop from N = 1 to {largest}, {which} size [95% interval]" for which in ("smaller", "larger")]
    columns += ["the smaller size's drop - the larger's [95% interval]"]
    entries = []
    for small, large in zip(sizes, sizes[1:]):
        options = {}
        for size in (small, large):
            names = {
                lr: [setting(steps, size=size, n=n, lr=lr, sft=st.sft[size])["name"] for n in (1, largest)]
                for lr in st.mode.get("lrs", [LR])
            }
            options[size] = {
                lr: {1: st.groups[a], largest: st.groups[b]}
                for lr, (a, b) in names.items()
                if a in st.groups and b in st.groups
            }
        x, y = min(
            ((x, y) for x in options[small] for y in options[large]),
            key=lambda p: abs(gap(options[small][p[0]]) - gap(options[large][p[1]])),
        )
        row = {"learning rates": f"{x:g}, {y:g}"}
        for which, by_n in (("smaller", options[small][x]), ("larger", options[large][y])):
            row[f"log-prob gap per token at N = {largest}, {which} size"] = st.row(by_n[largest])[
                "log-prob gap (per token)"
            ]
            test = drop(by_n, largest)
            row[f"drop from N = 1 to {largest}, {which} size [95% interval]"] = test | {"shown": interval(test)}
        how = f"per seed, the {SIZES[small]} policy's drop from N = 1 to {largest} - the {SIZES[large]} one's"
        test = drop_difference(options[small][x], options[large][y], largest, how)
        row["the smaller size's drop - the larger's [95% interval]"] = test | {"shown": interval(test)}
        entries.append((f"{SIZES[small]}, {SIZES[large]}", row))
    title = f"Table {number}. Neighbouring sizes at their closest drift (online DPO; described, not judged)"
    return table(title, columns, entries)


def compute_table(st: Study, number: int) -> dict:
    """The compute optimizations beside their baseline, and the generation-bound pair."""
    columns = ["setting", "seeds", "updates", "completions sampled", "mean gold over the run", "final gold reward"]
    columns += ["final KL", "wall time (s)", "s/step", "G (s/step)", "T (s/step)"]
    steps, names = st.mode["steps"], []
    names += [
        (setting(steps)["name"], "baseline: k = 2, E = 1"),
        (setting(steps, updates=2)["name"], "E = 2 updates per batch"),
    ]
    names += [(setting(steps // 2, k=4)["name"], "k = 4, half the batches")]
    if "bound" in st.mode:
        label = f"generation-bound (async, {st.mode['bound']['eval_prompts']} prompts evaluated a version)"
        names += [(bound_setting(st.mode, e)["name"], f"{label}: E = {e}") for e in (1, 2)]
    entries = []
    for key, label in names:
        a = st.groups[key][0]["args"]
        row = {"updates": str(a["num_steps"] * a["updates_per_batch"])}
        row["completions sampled"] = str(a["num_steps"] * a["batch_size"] * a["num_samples"])
        entries.append((label, st.rows[key] | row))
    return table(f"Table {number}. The compute optimizations (online DPO, size {BASE_SIZE}, N = 1)", columns, entries)


def default_check_table(st: Study, number: int) -> dict:
    """The default run against k = 4 in half its batches, with the paired differences by the same rule."""
    d2, d4 = default_check(2)["name"], default_check(4)["name"]
    entries = [("`python async_online_dpo.py`", st.rows[d2])]
    entries.append(("`python async_online_dpo.py --num_samples 4 --num_steps 64`", st.rows[d4]))
    diffs = {"seeds": st.rows[d2]["seeds"]}
    for column, fn, source, claim, decimals in [
        ("final gold reward", final_gold, GOLD, ">=", 3),
        ("final KL", final_kl, KL, ">", 3),
        ("wall time (s)", summary("wall_time"), "summary.json: wall_time", "<", 1),
    ]:
        test = paired(
            st.groups[d4], st.groups[d2], of(fn), f"per seed, {column}: k = 4 - k = 2", source, claim, decimals
        )
        split = across_machines(st.groups[d4], st.groups[d2]) if column == "wall time (s)" else []
        diffs[column] = test | {"shown": split[0] if split else interval(test)}
    entries.append(("difference, k = 4 - k = 2 [95% interval]", diffs))
    columns = ["run", "seeds", "final gold reward", "final KL", "wall time (s)"]
    return table(
        f"Table {number}. The default run against four samples per prompt in half its batches", columns, entries
    )


def every_table(st: Study, number: int) -> dict:
    columns = ["setting", "loss", "size", "N", "E", "k", "lr", "SFT steps", "updates", "seeds", "SFT gold reward"]
    columns += ["final gold reward", "final KL", "mean gold over the run", "mean lag (updates)"]
    columns += ["log-prob gap (per token)", "wall time (s)", "s/step", "G (s/step)", "T (s/step)"]
    entries = []
    for key, runs in st.groups.items():
        a = runs[0]["args"]
        label = {"loss": LOSSES.get(a["loss_type"], a["loss_type"]), "size": SIZES[a["model_size"]]}
        label |= {"N": str(a["batches_per_round"]), "E": str(a["updates_per_batch"]), "k": str(a["num_samples"])}
        label |= {"lr": f"{a['learning_rate']:g}", "SFT steps": str(a["sft_steps"])}
        entries.append((key, st.rows[key] | label | {"updates": str(a["num_steps"] * a["updates_per_batch"])}))
    return table(f"Table {number}. Every setting", columns, entries)


def draw_plots(st: Study):
    """The paper's frontier (final gold against final KL, a marker per N), the cost of off-policy data against the
    measured drift, and the compute optimizations' curves."""
    path = lambda name: os.path.join(st.results_dir, name)  # noqa: E731
    panels = [(LOSSES[x], by_n, sft(by_n[1][0])) for x, by_n in st.by_loss.items()]
    title = f"Final gold reward against final KL across the paper's N, by loss (size {BASE_SIZE})"
    plots.frontier(path("losses.png"), panels, title, final_gold, final_kl)
    label = {x: f"online DPO, {SIZES[x]} ({st.sft[x]} SFT steps, lr {st.lr[x]:g})" for x in st.by_size}
    panels = [(label[x], by_n, sft(by_n[1][0])) for x, by_n in st.by_size.items()]
    title = "Final gold reward against final KL across the paper's N, by policy size (online DPO)"
    plots.frontier(path("sizes.png"), panels, title, final_gold, final_kl)
    series = {f"{LOSSES[x]} ({SIZES[BASE_SIZE]}, lr {LR:g})": by_n for x, by_n in st.by_loss.items()}
    # each size at its own warm start and rate, unless those are the losses' (the same runs as online DPO's above)
    series |= {label[x]: by_n for x, by_n in st.by_size.items() if by_n[1] is not st.by_loss["sigmoid"][1]}
    plots.drift(path("drift.png"), series, final_gold, logprob_gap)
    base, e2, k4 = st.setting(), st.setting(updates=2), st.groups[setting(st.mode["steps"] // 2, k=4)["name"]]
    curves = {"E = 1 (baseline)": (base, "tab:blue"), "E = 2": (e2, "tab:orange")}
    plots.tradeoff(path("updates_per_batch.png"), curves, "Two updates per batch against one")
    curves = {"k = 2 (baseline)": (base, "tab:blue"), "k = 4, half the batches": (k4, "tab:green")}
    plots.tradeoff(path("num_samples.png"), curves, "Four samples per prompt against two")


def make_report(results_dir: str):
    st = load_study(results_dir)
    tables = [stage_table(st)]
    tables.append(
        robustness_table(st, f"Table 2. Off-policy robustness by loss (size {BASE_SIZE})", "loss", LOSSES, st.by_loss)
    )
    labels = {s: SIZES[s] for s in st.by_size}
    tables.append(
        robustness_table(st, "Table 3. Off-policy robustness of online DPO by policy size", "size", labels, st.by_size)
    )
    tables.append(drift_table(st, len(tables) + 1))
    tables.append(compute_table(st, len(tables) + 1))
    tables += [default_check_table(st, len(tables) + 1)] if "default_check" in st.mode else []
    tables.append(every_table(st, len(tables) + 1))
    verdicts = loss_claims(st) + size_claims(st) + compute_claims(st)
    draw_plots(st)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(report_text(st.record, st.mode, verdicts, tables))
    results = {"study": st.record, "margin": MARGIN, "claims": verdicts, "tables": tables}
    write_json(os.path.join(results_dir, "results.json"), results)
    print(f"wrote {os.path.join(results_dir, 'results.md')}")
    for v in verdicts:
        print(f"- {v['id']}. {v['claim']}: {v['outcome']}")


def judged(id_: str, figure: str, text: str, test: dict | None, reasons=()) -> dict:
    """One claim or sub-claim, as the rule judges its comparison; reasons: why this setting cannot test it."""
    if reasons or test is None:
        return dict(id=id_, figure=figure, claim=text, outcome="not tested here", reasons=list(reasons), test=test)
    out = dict(id=id_, figure=figure, claim=text, outcome=test["outcome"], reasons=[], test=test)
    if test["low"] is None:  # one seed: the sign says which way it points, nothing more
        side = test["mean"] > (-MARGIN if test["claim"] == ">=" else 0) if test["claim"] != "<" else test["mean"] < 0
        out["direction"] = "as the paper" if side else "against the paper"
    return out


def overall(id_: str, figure: str, text: str, subs: list[dict], reasons=()) -> dict:
    """A claim made of sub-claims (1a, 1b, ...): holds if all hold, reversed if any is reversed, else undecided."""
    if reasons or not subs:
        return dict(id=id_, figure=figure, claim=text, outcome="not tested here", reasons=list(reasons), test=None)
    out = dict(id=id_, figure=figure, claim=text, outcome=combine([s["outcome"] for s in subs]), reasons=[], test=None)
    if all("direction" in s for s in subs):
        out["direction"] = combine(["holds" if s["direction"] == "as the paper" else "reversed" for s in subs])
        out["direction"] = {"holds": "as the paper", "reversed": "against the paper"}.get(out["direction"], "mixed")
    return out


def verdict_line(v: dict) -> str:
    """A claim's row in the verdict table: what the rule says, and the numbers it rests on."""
    outcome = f"**{v['outcome']}**"
    if "direction" in v:
        outcome += f" (one seed; it points {v['direction']})" if v["direction"] != "mixed" else " (one seed; mixed)"
    evidence = "; ".join(v["reasons"]) if v["reasons"] else interval(v["test"]) if v["test"] else "its sub-claims below"
    if v.get("axis"):
        rises = [f"{a['text']} and ends higher on-policy by {interval(a)}" for a in v["axis"]]
        evidence += ", on a size axis (SFT gold, then paired final gold at N = 1): " + "; ".join(rises)
    if v["test"] and not v["reasons"] and v["test"]["seeds_for_margin"]:
        evidence += f"; {v['test']['seeds_for_margin']} seeds would resolve ±{MARGIN} at this spread"
    return f"| {v['id']} | {v['figure']} | {v['claim']} | {outcome} | {evidence} |"


def report_text(record: dict, mode: dict, verdicts: list[dict], tables: list[dict]) -> str:
    packages = record["packages"]
    machines = collections.Counter(machine_text(r.get("machine", record["machine"]), ram=True) for r in record["runs"])
    on = (
        next(iter(machines))
        if len(machines) == 1
        else f"{len(machines)} machines, " + "; ".join(f"{n} run{'s' * (n > 1)} on {m}" for m, n in machines.items())
    )
    took = f" (took {record['seconds'] / 60:.1f} min)" if "seconds" in record else ""
    if record.get("resumed"):
        took += f", interrupted and resumed with `--resume` on {', '.join(record['resumed'])}"
    other = [r["other_cores"] for r in record["runs"]]
    lines = "\n".join(verdict_line(v) for v in verdicts)
    sections = "\n\n".join(markdown(t) for t in tables[1:-1])
    return f"""# The off-policy study

`{record["command"]}`, run {record["date"]}{took} on {on}; torch {packages["torch"]}, vllm {packages["vllm"]}, \
transformers {packages["transformers"]}. Other processes kept {statistics.fmean(other):.2f} cores busy on average \
while the runs ran, at most {max(other):.2f} during one run (timings are fair only near 0).

Every run of the off-policy study is `sync_baseline.py` with `--batch_size {mode["batch_size"]} {mode["flags"]}`, \
the paper's N as `--batches_per_round N` (one policy version samples N batches, trained on at lags 0 .. N - 1) and \
its own flags; seeds {", ".join(map(str, mode["seeds"]))}. A number is a mean over seeds, ± their standard \
deviation; a final gold reward or KL is the mean over a run's final evaluations. \
[docs/study.md](../../docs/study.md#how-the-study-decides) states the rule and what each experiment tests.

## The paper's claims at this scale

Each comparison is paired by seed: the mean difference and its 95% Student t interval over seeds, [low, high]. A \
claim holds if the interval lies on its side of 0 (of -{MARGIN} for "as high"), is reversed if it lies on the other \
side, and is undecided otherwise. One seed gives a direction, never a verdict.

| claim | the paper | what it says | here | the numbers: mean difference [95% interval] |
| --- | --- | --- | --- | --- |
{lines}

![final gold reward against final KL by loss](losses.png)

![final gold reward against final KL by policy size](sizes.png)

![the drop from N = 1 against the measured drift](drift.png)

{markdown(tables[0])}

{sections}

![two updates per batch against one](updates_per_batch.png)

![four samples per prompt against two](num_samples.png)

{markdown(tables[-1])}
"""


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
