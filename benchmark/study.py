"""The paper's off-policy study on the built-in task, at the paper's staleness: how much stale data each loss
tolerates (Fig. 4), each loss at its own learning rate, and whether an off-policy correction (--tis_cap) makes online
DPO more robust still. Each claim is judged by a rule fixed in advance (docs/study.md, "How the study decides").

    python benchmark/study.py                # full: 5 seeds, N in {1, 2, 4, 8, 16} in 256 updates (about 6 h, 2 cores)
    python benchmark/study.py --quick        # 1 seed, N in {1, 4} in 64 updates: directions only (about 15 min)
    python benchmark/study.py --tiny         # seconds a run, for CI (tests/test_study.py)
    python benchmark/study.py --resume       # go on with an interrupted study: its finished runs are kept
    python benchmark/study.py --report_only  # rebuild results.md, results.json and the plots from raw/

Every run is sync_baseline.py with the paper's N (--batches_per_round N): one policy version samples N batches,
trained on at lags 0 .. N - 1, as in the paper's own study. The study runs in two stages, each decided by the
finished runs before it: (1) each loss's learning rate, from on-policy (N = 1) runs alone, (2) everything else, one
seed at a time. It shares run.py's harness (one run at a time, the machine and versions recorded, every number kept
with the file it came from) and builds the report from the run folders alone. After each run it prints the time
spent and an estimate of the time left.

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
    """the scripts' --cache_dir: the warm-started model is built there once and shared by every run"""
    quick: bool = False
    """a smaller study (about 15 minutes on 2 cores): one seed, so it shows directions, not verdicts"""
    tiny: bool = False
    """seconds a run: checks that everything works (CI), measures nothing"""
    resume: bool = False
    """go on with an interrupted study in --results_dir (None: the newest runs/study_{mode}_*): its runs are kept"""
    report_only: bool = False
    """run nothing: rebuild the report from the runs in --results_dir/raw (by default benchmark/study_results/raw)"""


# ----------------------------------------------------------------------------------------------------
# What to run. Every run is sync_baseline.py's defaults (built-in task, 10.6 M policy, 30 SFT steps, k = 2, β 0.1)
# plus the mode's flags and its own. docs/study.md gives the reasons for each number.
LOSSES = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT"}
CORRECTED = "online DPO + TIS"  # online DPO with the off-policy correction, at online DPO's rate
TIS_CAP = 2.0  # --tis_cap: truncated importance sampling's usual cap (verl's default)
MARGIN = 0.03  # the smallest difference in final gold reward that matters here
LEARNS = 0.1  # an on-policy run learns if its gain over the SFT policy has a 95% interval above this
ALPHA = 0.05  # the family-wise error rate of the judged comparisons (Holm)
MODES = {
    "full": dict(
        seeds=[1, 2, 3, 4, 5],
        steps=256,  # the paper's Fig. 4: 256 updates, so N = 16 is 16 rounds at a mean lag of 7.5
        batch_size=8,  # 2048 prompts a run, as the previous study's 64 updates of 32
        n=[1, 2, 4, 8, 16],
        corrected_n=[1, 4, 16],
        flags="--eval_every 64 --eval_every_at_end 16",
        share_cores_at_n1=True,  # --cpu_share_cores where generator and trainer take turns (N = 1) alone
        lrs=[2.5e-5, 5e-5, 1e-4],
        extensions=2,  # a rate chosen at an end of the grid moves that end by a factor of 2, at most this often
        lr_seeds=[1, 2],
    ),
    "quick": dict(
        seeds=[1],
        steps=64,
        batch_size=8,
        n=[1, 4],  # 16 rounds at N = 4
        corrected_n=[1, 4],
        flags="--eval_every 16 --eval_every_at_end 4 --eval_prompts 128",
        share_cores_at_n1=True,
        lrs=[5e-5],
        extensions=0,
        lr_seeds=[1],
    ),
    "tiny": dict(
        seeds=[1],
        steps=4,
        batch_size=8,
        n=[1, 2],
        corrected_n=[1, 2],
        flags="--micro_batch_size 4 --eval_every 2 --eval_every_at_end 1 --eval_prompts 16",
        lrs=[1e-4],  # the stage's rule is tested without runs (tests/test_study.py): each run here costs CI 20 s
        extensions=0,
        lr_seeds=[1],
    ),
}


def setting(steps: int, loss="sigmoid", n=1, lr=1e-4, tis=False) -> dict:
    """One setting of the study's runs: its name (the runs' --exp_name) and its flags."""
    name = f"{loss}{'_tis' if tis else ''}_lr{lr:g}_N{n}_steps{steps}"
    flags = f"--loss_type {loss} --batches_per_round {n} --num_steps {steps} --learning_rate {lr:g}"
    flags += f" --tis_cap {TIS_CAP:g}" * tis
    return dict(name=name, loss=loss, n=n, steps=steps, lr=lr, tis=tis, flags=flags.split())


def lr_grid(mode: dict, groups: dict, loss: str) -> tuple[list[float], float | None]:
    """Stage 1's rule for one loss, from its N = 1 runs on mode["lr_seeds"] alone: the rate of the grid with the best
    mean final gold reward (the smaller of a tie). Where that is an end of the grid, and extensions are left, the grid
    grows by that end's value halved (or doubled) and the rule applies again. Returns the grid so far and the rate,
    or None while a run of the grid is missing."""
    grid = sorted(mode["lrs"])
    for extension in range(mode["extensions"] + 1):
        runs = {lr: groups.get(setting(mode["steps"], loss, 1, lr)["name"], []) for lr in grid}
        runs = {lr: [r for r in rs if r["seed"] in mode["lr_seeds"]] for lr, rs in runs.items()}
        if any(len(rs) < len(mode["lr_seeds"]) for rs in runs.values()):
            return grid, None
        best = max(grid, key=lambda lr: (statistics.fmean(final_gold(r) for r in runs[lr]), -lr))
        if len(grid) == 1 or best not in (grid[0], grid[-1]) or extension == mode["extensions"]:
            return grid, best
        grid = [grid[0] / 2, *grid] if best == grid[0] else [*grid, grid[-1] * 2]
    raise AssertionError("unreachable")


def choose_lr(mode: dict, groups: dict) -> dict:
    """{loss: its learning rate}; a loss not yet decided is missing."""
    return {loss: lr for loss in LOSSES if (lr := lr_grid(mode, groups, loss)[1]) is not None}


def stage_2(mode: dict, lr: dict) -> list[dict]:
    """Every loss at every N, and online DPO with the correction at its N, at the rates stage 1 chose; seed by seed,
    so that a slow spell of the machine hits every setting alike."""
    steps, settings = mode["steps"], []
    settings += [setting(steps, loss, n, lr[loss]) for loss in LOSSES for n in mode["n"]]
    settings += [setting(steps, "sigmoid", n, lr["sigmoid"], tis=True) for n in mode["corrected_n"]]
    return [s | {"seed": seed} for seed in mode["seeds"] for s in settings]


def stage_1(mode: dict, grids: dict) -> list[dict]:
    """Each loss's grid (grids: {loss: rates}) at N = 1 on mode["lr_seeds"], seed by seed."""
    steps = mode["steps"]
    return [
        setting(steps, loss, 1, lr) | {"seed": s} for s in mode["lr_seeds"] for loss in LOSSES for lr in grids[loss]
    ]


def plan(mode: dict, groups: dict) -> list[dict]:
    """The runs that the finished ones (groups) decide, in the order to run them: stage 1's grids until every rate is
    chosen, then stage 2. No N > 1 run is planned before every loss's rate is chosen. A study runs these, then plans
    again."""
    grids = {loss: lr_grid(mode, groups, loss) for loss in LOSSES}
    runs = stage_1(mode, {loss: grid for loss, (grid, _) in grids.items()})
    if any(chosen is None for _, chosen in grids.values()):
        return unique(runs)
    return unique(runs + stage_2(mode, {loss: chosen for loss, (_, chosen) in grids.items()}))


def expected_runs(mode: dict, groups: dict) -> int:
    """How many runs the whole study takes, as far as the finished ones tell: a grid not yet decided is taken to need
    no extension, and a rate not yet chosen to be one of its grid's (its N = 1 runs are then shared)."""
    grids = {loss: lr_grid(mode, groups, loss) for loss in LOSSES}
    lr = {loss: chosen if chosen is not None else grid[0] for loss, (grid, chosen) in grids.items()}
    return len(unique(stage_1(mode, {loss: grid for loss, (grid, _) in grids.items()}) + stage_2(mode, lr)))


def unique(runs: list[dict]) -> list[dict]:
    """Each run (name and seed) once, where first planned: the grid's on-policy runs are also stage 2's."""
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
        cmd = [sys.executable, os.path.join(ROOT, "sync_baseline.py"), "--batch_size", str(mode["batch_size"])]
        # At N = 1 generator and trainer take turns, so each may use every core. At N > 1 the generator samples the
        # round's next batch while the trainer trains: each keeps its own core (shared, each step took 1.5 times as
        # long). Either way every number but the times is the same (docs/study.md).
        cmd += ["--cpu_share_cores"] * (run["n"] == 1 and mode.get("share_cores_at_n1", False))
        return [*cmd, *mode["flags"].split(), *run["flags"], "--cache_dir", cache_dir]  # the run's flags win

    ran = False
    while True:
        groups = load_groups(args.results_dir, record)
        done = {(r["name"], r["seed"]) for r in record["runs"]}
        to_run = [run for run in plan(mode, groups) if (run["name"], run["seed"]) not in done]
        if not to_run:
            break
        if not ran:  # the warm start is built (or found in the cache) first, so that no run's wall time includes it
            code = "import sys, tyro, async_online_dpo as A; A.warm_start(tyro.cli(A.Args, args=sys.argv[1:]))"
            print("warm start ...", flush=True)
            log = os.path.join(args.results_dir, "logs", "warm_start.log")
            execute([sys.executable, "-c", code, "--cache_dir", cache_dir], log)
        later = expected_runs(mode, groups) - len(done) - len(to_run)  # in the stage still to come
        run_in_turn(to_run, base_cmd, args.results_dir, record, "study.json", later=max(0, later))
        ran = True
    if not ran:
        print(f"nothing left to run: {args.results_dir}/raw/study.json lists every run; only the report is rebuilt")


# ----------------------------------------------------------------------------------------------------
# What one run shows. Its final gold reward and KL are the means over its final evaluations, those after version
# num_steps - eval_every (every --eval_every_at_end versions there): a mean of several is steadier than the last alone.
def final_evals(run: dict) -> list[dict]:
    return [e for e in run["evals"] if e["eval/version"] > run["args"]["num_steps"] - run["args"]["eval_every"]]


def final_gold(run: dict) -> float:
    return statistics.fmean(e["eval/gold_reward"] for e in final_evals(run))


def final_kl(run: dict) -> float:
    return statistics.fmean(e["eval/kl"] for e in final_evals(run))


def sft(run: dict) -> float:
    return run["evals"][0]["eval/gold_reward"]


def logprob_gap(run: dict) -> float:
    """Mean per-token |log π_trainer - log π_sampler| over a run's steps (left out: NaN steps, every pair tied)."""
    return statistics.fmean(g for r in run["steps"] if not math.isnan(g := r["async/logprob_gap"]))


def mean_lag(run: dict) -> float:
    return statistics.fmean(r["async/lag"] for r in run["steps"])


GOLD = "metrics.jsonl: mean eval/gold_reward of the final evaluations"
KL = "metrics.jsonl: mean eval/kl of the final evaluations"


# ----------------------------------------------------------------------------------------------------
# The decision rule (docs/study.md, "How the study decides"). Every comparison is paired by seed: per seed a difference
# d, and over the seeds its mean and Student t interval, mean ± t · sd / √n. A claim that d > 0 holds if the interval
# lies above 0, is reversed if it lies below 0, and is undecided otherwise. The claims judged form one family, and
# Holm's step-down procedure keeps its family-wise error at ALPHA: its verdicts are the study's. Each shows its raw
# 95% interval and its Holm interval, at the level of its step. One seed gives no interval: a direction, no verdict.
def t_two_sided_p(t: float, dof: int) -> float:
    """P(|T| ≥ |t|) for Student's t with dof degrees of freedom: the regularized incomplete beta I_x(dof/2, 1/2) at
    x = dof / (dof + t²), by its continued fraction (Numerical Recipes, betacf)."""
    x, a, b = dof / (dof + t * t), dof / 2, 0.5
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only: use I_x(a, b) = 1 - I_1-x(b, a)
        return 1.0 - front * beta_fraction(1 - x, b, a) / b
    return front * beta_fraction(x, a, b) / a


def beta_fraction(x: float, a: float, b: float) -> float:
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
            c = 1.0 + numerator / c
            c = c if abs(c) > 1e-300 else 1e-300
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_quantile(level: float, dof: int) -> float:
    """t such that P(|T| ≥ t) = 1 - level: the half-width factor of a two-sided `level` interval (bisection)."""
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, dof) > 1 - level else (low, mid)
    return (low + high) / 2


def decide(values: list[float], claim: str, gold: bool, level: float = 0.95) -> dict:
    """The rule's raw test, for one comparison's per-seed differences. claim: ">" (d > 0) or "<" (d < 0). Also its
    p-value (against d = 0, two-sided) for Holm, and for a difference in final gold the seeds that would resolve
    MARGIN at this spread."""
    if len(values) < 2 or any(math.isnan(v) for v in values):
        return dict(claim=claim, low=None, high=None, p=None, outcome="undecided", seeds_for_margin=None)
    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    outcome = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "undecided"
    if claim == "<":
        outcome = {"holds": "reversed", "reversed": "holds"}.get(outcome, outcome)
    p = t_two_sided_p(mean / (sd / math.sqrt(n)), n - 1) if sd > 0 else float(mean == 0)
    needed = None
    if gold:
        needed = next(m for m in range(2, 1000) if t_quantile(0.95, m - 1) * sd / math.sqrt(m) <= MARGIN or m == 999)
    return dict(claim=claim, low=mean - half, high=mean + half, p=p, outcome=outcome, seeds_for_margin=needed)


def holm(verdicts: list[dict]) -> None:
    """Holm's step-down procedure over the family of judged verdicts (those with an interval), in place: sorted by
    p-value, the i-th of m (from 0) is rejected, at level ALPHA / (m - i), if it and every one before it is. A rejected
    verdict keeps its side (holds or reversed); any other is undecided. Each gets the interval of its step's level."""
    family = sorted(
        (v for v in verdicts if v["test"] and v["test"]["p"] is not None and not v["reasons"]),
        key=lambda v: v["test"]["p"],
    )
    rejecting = True
    for i, v in enumerate(family):
        test, level = v["test"], ALPHA / (len(family) - i)
        rejecting = rejecting and test["p"] <= level
        n = len(test["values"])
        half = t_quantile(1 - level, n - 1) * statistics.stdev(test["values"]) / math.sqrt(n)
        v["raw_outcome"] = test["outcome"]
        v["outcome"] = test["outcome"] if rejecting else "undecided"
        v["holm"] = dict(step=i + 1, of=len(family), level=level, low=test["mean"] - half, high=test["mean"] + half)


def paired(runs: list[dict], reference: list[dict], diff, how: str, source: str, claim: str, decimals=3) -> dict:
    """diff(run, the reference run of the same seed), per seed that both have, and what the rule makes of it."""
    pairs = [(r, b) for r in runs for b in reference if b["seed"] == r["seed"]]
    values = [diff(r, b) for r, b in pairs]
    sources = [f"{r['folder']} vs {b['folder']}: {source}" for r, b in pairs]
    return cell(values, sources, decimals, how) | decide(values, claim, gold=source == GOLD)


def machine_text(m: dict, ram=False) -> str:
    return f"{m['cores']} cores ({m['cpu']}), " + (f"{m['ram_gib']:.1f} GiB RAM, " if ram else "") + f"GPU: {m['gpu']}"


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
@dataclass
class Study:
    """A finished study as the report reads it: its record, its runs by setting (each with its args.json), what stage
    1 chose, and each method's runs by N ("sigmoid", "rloo", "best_of_k" and CORRECTED)."""

    results_dir: str
    record: dict
    mode: dict
    groups: dict
    lr: dict
    by_method: dict

    def label(self, method: str) -> str:
        return LOSSES.get(method, method)


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
    steps, lr = mode["steps"], choose_lr(mode, groups)
    by_method = {loss: {n: groups[setting(steps, loss, n, lr[loss])["name"]] for n in mode["n"]} for loss in LOSSES}
    by_method[CORRECTED] = {
        n: groups[setting(steps, "sigmoid", n, lr["sigmoid"], tis=True)["name"]] for n in mode["corrected_n"]
    }
    return Study(results_dir, record, mode, groups, lr, by_method)


def cells(runs: list[dict]) -> dict:
    """What the tables can show of one setting (its runs, one a seed), by column."""
    row = {"seeds": ", ".join(str(r["seed"]) for r in runs)}
    for column, fn, source, decimals in [
        ("SFT gold reward", sft, "metrics.jsonl: eval/gold_reward at version 0", 3),
        ("final gold reward", final_gold, GOLD, 3),
        ("final KL", final_kl, KL, 3),
        ("mean lag (updates)", mean_lag, "metrics.jsonl: mean async/lag", 2),
        ("log-prob gap (per token)", logprob_gap, "metrics.jsonl: mean of async/logprob_gap (NaN steps left out)", 4),
        ("wall time (s)", lambda r: r["summary"]["wall_time"], "summary.json: wall_time", 1),
    ]:
        row[column] = per_run(runs, [fn(r) for r in runs], source, decimals)
    return row


def gain(on_policy: list[dict]) -> dict:
    """Per seed, the final gold reward at N = 1 minus the SFT gold reward: what the on-policy run learned."""
    values = [final_gold(r) - sft(r) for r in on_policy]
    sources = [f"{r['folder']}/{GOLD} - eval/gold_reward at version 0" for r in on_policy]
    test = cell(values, sources, 3, "per seed, final gold at N = 1 - SFT gold") | decide(values, ">", gold=False)
    learns = test["low"] > LEARNS if test["low"] is not None else test["mean"] > LEARNS
    return test | {"shown": interval(test), "learns": learns}


def drop(by_n: dict, n: int) -> dict:
    """Per seed, the final gold reward at N = 1 minus that at N: how much the stale data costs."""
    test = paired(by_n[1], by_n[n], of(final_gold), "final gold at N = 1 - final gold at this N, per seed", GOLD, ">")
    needed = f"; {test['seeds_for_margin']} seeds for ±{MARGIN}" if test["seeds_for_margin"] else ""
    return test | {"shown": interval(test) + needed}


def drop_difference(more: dict, less: dict, largest: int, how: str) -> dict:
    """Per seed, more's drop minus less's (more, less: {N: runs}): above 0 when `less` loses less to stale data."""

    def drops(by_n):
        at = {r["seed"]: r for r in by_n[largest]}
        return {r["seed"]: final_gold(r) - final_gold(at[r["seed"]]) for r in by_n[1] if r["seed"] in at}

    a, b = drops(more), drops(less)
    seeds = sorted(set(a) & set(b))
    folders = {
        s: [r["folder"] for runs in (more[1], more[largest], less[1], less[largest]) for r in runs if r["seed"] == s]
        for s in seeds
    }
    sources = [f"{', '.join(folders[s])}: {GOLD}" for s in seeds]
    values = [a[s] - b[s] for s in seeds]
    return cell(values, sources, 3, how) | decide(values, ">", gold=True)


def stage_table(st: Study) -> dict:
    """Table 1: stage 1, each loss's learning rate from its N = 1 runs, and where those runs stand in the run order."""
    order = {(r["name"], r["seed"]): i for i, r in enumerate(st.record["runs"], 1)}
    first_stale = min((i for (name, _), i in order.items() if "_N1_" not in name), default=None)
    grids = {loss: lr_grid(st.mode, st.groups, loss)[0] for loss in LOSSES}
    every_lr = sorted({lr for grid in grids.values() for lr in grid})
    entries = []
    for loss in LOSSES:
        row = {"learning rate (stage 1)": f"{st.lr[loss]:g}"}
        for lr in grids[loss]:
            runs = [
                r for r in st.groups[setting(st.mode["steps"], loss, 1, lr)["name"]] if r["seed"] in st.mode["lr_seeds"]
            ]
            row[f"final gold at N = 1, lr {lr:g}"] = per_run(runs, [final_gold(r) for r in runs], GOLD, 3)
        mine = [
            order[(setting(st.mode["steps"], loss, 1, lr)["name"], s)]
            for lr in grids[loss]
            for s in st.mode["lr_seeds"]
        ]
        row["its grid's runs, in the run order"] = ", ".join(f"#{i}" for i in sorted(mine))
        entries.append((LOSSES[loss], row))
    columns = ["loss", "learning rate (stage 1)", *[f"final gold at N = 1, lr {lr:g}" for lr in every_lr]]
    columns += ["its grid's runs, in the run order"]
    title = "Table 1. Stage 1: each loss's learning rate, from N = 1 runs alone"
    title += f" (the first N > 1 run is #{first_stale} of {len(order)})" if first_stale else ""
    return table(title, columns, entries)


def learning_table(st: Study) -> dict:
    """Table 2: does each method's on-policy run learn (the gain's 95% interval above LEARNS)?"""
    entries = []
    for method, by_n in st.by_method.items():
        g = gain(by_n[1])
        row = cells(by_n[1]) | {"on-policy gain [95% interval]": g, "learns?": "yes" if g["learns"] else "**no**"}
        row["learning rate"] = f"{st.lr['sigmoid' if method == CORRECTED else method]:g}"
        entries.append((st.label(method), row))
    columns = [
        "method",
        "learning rate",
        "seeds",
        "SFT gold reward",
        "final gold reward",
        "on-policy gain [95% interval]",
    ]
    columns += ["learns?"]
    return table(
        f"Table 2. On-policy (N = 1): what each method learns (it learns if the interval lies above {LEARNS})",
        columns,
        entries,
    )


def by_n_table(st: Study, title: str, column: str) -> dict:
    """One quantity of each method at each N (mean ± std over seeds)."""
    ns = st.mode["n"]
    entries = [(st.label(m), {f"N = {n}": cells(by_n[n])[column] for n in by_n}) for m, by_n in st.by_method.items()]
    return table(title, ["method", *[f"N = {n}" for n in ns]], entries)


def drop_table(st: Study) -> dict:
    ns = st.mode["n"]
    entries = [(st.label(m), {f"N = {n}": drop(by_n, n) for n in by_n if n != 1}) for m, by_n in st.by_method.items()]
    title = f"Table 6. The drop in final gold reward from N = 1, per seed [95% interval]; seeds to resolve ±{MARGIN}"
    return table(title, ["method", *[f"N = {n}" for n in ns[1:]]], entries)


def claims(st: Study) -> list[dict]:
    """Claims 1 (Fig. 4) and 5, judged by their paired drops from N = 1 to the largest N, then corrected by Holm."""
    largest, learns = max(st.mode["n"]), {m: gain(by_n[1])["learns"] for m, by_n in st.by_method.items()}
    dpo, subs = st.by_method["sigmoid"], []
    for letter, other in (("a", "rloo"), ("b", "best_of_k")):
        how = f"per seed, {LOSSES[other]}'s drop from N = 1 to {largest} - online DPO's"
        test = drop_difference(st.by_method[other], dpo, largest, how)
        reasons = [
            f"{st.label(m)}'s on-policy run does not learn by the rule (Table 2)"
            for m in ("sigmoid", other)
            if not learns[m]
        ]
        subs.append(
            judged(
                f"1{letter}",
                "Fig. 4",
                f"online DPO loses less than {LOSSES[other]} from N = 1 to {largest}",
                test,
                reasons,
            )
        )
    largest_c = max(st.mode["corrected_n"])
    how = f"per seed, online DPO's drop from N = 1 to {largest_c} - that of online DPO + TIS"
    test = drop_difference(dpo, st.by_method[CORRECTED], largest_c, how)
    reasons = [
        f"{st.label(m)}'s on-policy run does not learn by the rule (Table 2)"
        for m in ("sigmoid", CORRECTED)
        if not learns[m]
    ]
    text = f"the correction (--tis_cap {TIS_CAP:g}) reduces online DPO's drop from N = 1 to {largest_c}"
    five = judged("5", "new", text, test, reasons)
    holm([*subs, five])
    return [overall("1", "Fig. 4", "Online DPO is the most robust to off-policy data", subs), *subs, five]


def described(st: Study) -> dict:
    """Table 7, reported and described, not judged: the final gold reward at the largest N, online DPO against each
    other loss and the correction against online DPO, paired by seed: what a user of each method gets. Beside each,
    the seeds that would resolve ±MARGIN at its spread."""
    largest, largest_c, dpo = max(st.mode["n"]), max(st.mode["corrected_n"]), st.by_method["sigmoid"]
    pairs = [
        (f"online DPO - {LOSSES[other]}", largest, dpo[largest], st.by_method[other][largest])
        for other in ("rloo", "best_of_k")
    ]
    pairs.append(("online DPO + TIS - online DPO", largest_c, st.by_method[CORRECTED][largest_c], dpo[largest_c]))
    margin = f"seeds to resolve ±{MARGIN}"
    entries = []
    for label, n, runs, reference in pairs:
        test = paired(runs, reference, of(final_gold), f"per seed, final gold at N = {n}: {label}", GOLD, ">")
        row = {"mean difference [95% interval]": test | {"shown": interval(test)}}
        row[margin] = str(test["seeds_for_margin"]) if test["seeds_for_margin"] else "—"
        entries.append((f"{label}, N = {n}", row))
    title = "Table 7. Final gold reward at the largest N, paired by seed (described, not judged)"
    return table(title, ["comparison", "mean difference [95% interval]", margin], entries)


def every_table(st: Study) -> dict:
    columns = ["setting", "loss", "N", "lr", "correction", "seeds", "SFT gold reward", "final gold reward", "final KL"]
    columns += ["mean lag (updates)", "log-prob gap (per token)", "wall time (s)"]
    entries = []
    for key, runs in st.groups.items():
        a = runs[0]["args"]
        label = {"loss": LOSSES[a["loss_type"]], "N": str(a["batches_per_round"]), "lr": f"{a['learning_rate']:g}"}
        label["correction"] = f"--tis_cap {a['tis_cap']:g}" if a.get("tis_cap") is not None else "none"
        entries.append((key, cells(runs) | label))
    return table("Table 9. Every setting", columns, entries)


def draw_plots(st: Study):
    """The paper's frontier (final gold against final KL, a marker per N) per method, and the drop against drift."""
    path = lambda name: os.path.join(st.results_dir, name)  # noqa: E731
    panels = [
        (f"{st.label(m)} (lr {st.lr['sigmoid' if m == CORRECTED else m]:g})", by_n, sft(by_n[1][0]))
        for m, by_n in st.by_method.items()
    ]
    plots.frontier(
        path("losses.png"), panels, "Final gold reward against final KL across N (size 10.6 M)", final_gold, final_kl
    )
    plots.drift(path("drift.png"), {st.label(m): by_n for m, by_n in st.by_method.items()}, final_gold, logprob_gap)


def make_report(results_dir: str):
    st = load_study(results_dir)
    tables = [stage_table(st), learning_table(st)]
    tables.append(by_n_table(st, "Table 3. Final gold reward by N", "final gold reward"))
    tables.append(by_n_table(st, "Table 4. Final KL by N", "final KL"))
    tables.append(by_n_table(st, "Table 5. How stale: the mean lag (updates) by N", "mean lag (updates)"))
    tables.append(drop_table(st))
    tables.append(described(st))
    tables.append(
        by_n_table(
            st, "Table 8. The log-prob gap per token between trainer and sampler, by N", "log-prob gap (per token)"
        )
    )
    tables.append(every_table(st))
    verdicts = claims(st)
    draw_plots(st)
    with open(os.path.join(results_dir, "results.md"), "w") as f:
        f.write(report_text(st.record, st.mode, verdicts, tables))
    results = {
        "study": st.record,
        "margin": MARGIN,
        "learns": LEARNS,
        "alpha": ALPHA,
        "claims": verdicts,
        "tables": tables,
    }
    write_json(os.path.join(results_dir, "results.json"), results)
    print(f"wrote {os.path.join(results_dir, 'results.md')}")
    for v in verdicts:
        print(f"- {v['id']}. {v['claim']}: {v['outcome']}{direction(v)}")


def judged(id_: str, figure: str, text: str, test: dict | None, reasons=()) -> dict:
    """One claim or sub-claim, as the rule judges its comparison; reasons: why this setting cannot test it."""
    if reasons or test is None:
        return dict(id=id_, figure=figure, claim=text, outcome="not tested here", reasons=list(reasons), test=test)
    out = dict(id=id_, figure=figure, claim=text, outcome=test["outcome"], reasons=[], test=test)
    if test["low"] is None:  # one seed: the sign says which way it points, nothing more
        out["direction"] = "as claimed" if (test["mean"] > 0) == (test["claim"] == ">") else "against the claim"
    return out


def overall(id_: str, figure: str, text: str, subs: list[dict]) -> dict:
    """A claim made of sub-claims (1a, 1b): holds if all hold, reversed if any is reversed, else undecided."""
    if all(s["outcome"] == "not tested here" for s in subs):
        return dict(
            id=id_, figure=figure, claim=text, outcome="not tested here", reasons=["its sub-claims are not"], test=None
        )
    out = dict(id=id_, figure=figure, claim=text, outcome=combine([s["outcome"] for s in subs]), reasons=[], test=None)
    if all("direction" in s for s in subs):
        ways = {s["direction"] for s in subs}
        out["direction"] = ways.pop() if len(ways) == 1 else "mixed"
    return out


def direction(v: dict) -> str:
    """With one seed, which way a verdict's difference points; else nothing."""
    if "direction" not in v:
        return ""
    return f" (one seed; it points {v['direction']})" if v["direction"] != "mixed" else " (one seed; mixed)"


def verdict_line(v: dict) -> str:
    """A claim's row in the verdict table: Holm's verdict, and the numbers it rests on."""
    outcome = f"**{v['outcome']}**{direction(v)}"
    if v["reasons"]:
        return f"| {v['id']} | {v['figure']} | {v['claim']} | {outcome} | {'; '.join(v['reasons'])} | | |"
    if not v["test"]:
        return f"| {v['id']} | {v['figure']} | {v['claim']} | {outcome} | its sub-claims below | | |"
    raw = interval(v["test"]) + (f", raw verdict: {v['raw_outcome']}" if "raw_outcome" in v else "")
    if v["test"]["seeds_for_margin"]:
        raw += f"; {v['test']['seeds_for_margin']} seeds would resolve ±{MARGIN} at this spread"
    h = v.get("holm")
    corrected = "—"
    if h:
        shown = interval(h | {"mean": v["test"]["mean"], "decimals": 3})
        corrected = f"{shown} (step {h['step']} of {h['of']}, level {h['level']:.4f})"
    p = f"{v['test']['p']:.4f}" if v["test"]["p"] is not None else "—"
    return f"| {v['id']} | {v['figure']} | {v['claim']} | {outcome} | {raw} | {corrected} | {p} |"


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
    sections = "\n\n".join(markdown(t) for t in tables[1:])
    shared = " (`--cpu_share_cores` too at N = 1)" if mode.get("share_cores_at_n1") else ""
    changes = "".join(f"\n\n*Changed during the study:* {c}" for c in record.get("changes", []))
    return f"""# The off-policy study at the paper's staleness

`{record["command"]}`, run {record["date"]}{took} on {on}; torch {packages["torch"]}, vllm {packages["vllm"]}, \
transformers {packages["transformers"]}. Other processes kept {statistics.fmean(other):.2f} cores busy on average \
while the runs ran, at most {max(other):.2f} during one run.

Every run is `sync_baseline.py` with `--batch_size {mode["batch_size"]} {mode["flags"]}`{shared}, \
{mode["steps"]} updates, the paper's N as `--batches_per_round N` (one policy version samples N batches, trained \
on at lags 0 .. N - 1) and its own flags; seeds {", ".join(map(str, mode["seeds"]))}. A number is a mean over \
seeds, ± their standard deviation; a final gold reward or KL is the mean over a run's final evaluations. \
[docs/study.md](../../docs/study.md#how-the-study-decides) states the rule and what each experiment tests.{changes}

## The claims at this scale

Each comparison is paired by seed: the mean difference and its 95% Student t interval over seeds, [low, high]. The \
judged comparisons form one family; Holm's procedure keeps its family-wise error at {ALPHA:g}, and its verdict is the \
study's: a claim holds if Holm rejects d = 0 on the claim's side, is reversed if on the other side, and is undecided \
otherwise. The Holm interval is the Student t interval at the level of the claim's step. One seed gives a direction, \
never a verdict.

| claim | the paper | what it says | here (Holm) | raw: mean difference [95% interval] | Holm interval | p (two-sided) |
| --- | --- | --- | --- | --- | --- | --- |
{lines}

![final gold reward against final KL by method](losses.png)

![the drop from N = 1 against the measured drift](drift.png)

{markdown(tables[0])}

{sections}
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
