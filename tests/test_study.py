"""The off-policy study end to end in its tiny configuration (about 4 minutes), and its rules without runs.

A reader's own script, check_report, recomputes every number and verdict of a study's results.md from its raw/ alone
(raw/study.json, and each run's args.json, metrics.jsonl and summary.json), without the study's code: its own
Student t (integrated from the density), its own stage-1 rule and its own Holm procedure, as docs/study.md ("How the
study decides") states them. The tiny study has one seed, one learning rate and runs of four updates, so copies of it
with made-up seeds, gold rewards and grids exercise the rest: intervals, p-values, the learning gate both ways, Holm's
verdicts (one made to differ from the raw verdict) and a learning-rate grid that grew. The stage rules (the grid, its
extensions, what runs when) are tested on made-up runs, and the study's own t functions against the reader's."""

import functools
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass

import matplotlib.image
import pytest

from conftest import (
    ROOT,
    RUNS,
    assert_shows,
    broken_cache,
    check_committed_report_rebuilds,
    clean_up_runs,
    interrupt,
    parse_tables,
    run_script,
    start,
    table,
)

STUDY_PY = os.path.join(ROOT, "benchmark", "study.py")
sys.path.insert(0, os.path.dirname(STUDY_PY))
import study as S  # noqa: E402  (its plan and its t functions, for the tests that check them; never the reader's)
from run import render  # noqa: E402  (a results.json entry as results.md shows it: to hold the two files together)


def study(*flags, timeout=600):
    return run_script(STUDY_PY, None, None, *flags, timeout=timeout)


# docs/study.md's numbers, restated here: the reader takes them from the page, not from the study's code.
MARGIN = 0.03  # the smallest difference in final gold reward that matters
LEARNS = 0.1  # an on-policy run learns if its gain's 95% interval lies above this (one seed: its gain)
ALPHA = 0.05  # Holm's family-wise error rate
TIS_CAP = 2.0  # the correction's --tis_cap
LABELS = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT", "tis": "online DPO + TIS"}
LOSSES = ["sigmoid", "rloo", "best_of_k"]
PLOTS = ["losses.png", "drift.png"]


@pytest.fixture(scope="module")
def tiny_study(cache_dir, tmp_path_factory) -> tuple[str, str]:
    """The tiny study, run once: its folder and what it printed."""
    path = str(tmp_path_factory.mktemp("study"))
    result = study("--tiny", "--results_dir", path, "--cache_dir", cache_dir, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path, result.stdout


@pytest.fixture(scope="module")
def results_dir(tiny_study) -> str:
    return tiny_study[0]


# ----------------------------------------------------------------------------------------------------
# The reader's Student t. With x = √ν tan θ, the density's mass dx is c cos^(ν-1) θ dθ, c = Γ((ν+1)/2) / (√π Γ(ν/2)):
# smooth and bounded on [0, π/2), so Simpson's rule integrates it to ~1e-12 at any t, far in the tail too.
def t_central(theta: float, dof: int, n: int = 2000) -> float:
    """P(|T| < √dof · tan θ) for Student's t with dof degrees of freedom."""
    c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(math.pi)
    h = theta / n
    total = (
        1 + math.cos(theta) ** (dof - 1) + sum((4 if i % 2 else 2) * math.cos(i * h) ** (dof - 1) for i in range(1, n))
    )
    return 2 * c * total * h / 3


def t_p(t: float, dof: int) -> float:
    """Two-sided p-value of t: P(|T| ≥ |t|)."""
    return 1 - t_central(math.atan(abs(t) / math.sqrt(dof)), dof)


@functools.lru_cache(maxsize=None)
def t_q(tail: float, dof: int) -> float:
    """The t with P(|T| ≥ t) = tail (0.05: the half-width factor of a 95% interval), by bisection on θ."""
    low, high = 0.0, math.pi / 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if t_central(mid, dof) < 1 - tail else (low, mid)
    return math.sqrt(dof) * math.tan((low + high) / 2)


def interval(diffs: list[float], tail: float = 0.05) -> tuple:
    """(mean, low, high) of the Student t interval at confidence 1 - tail; one value: (it, None, None)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, None, None
    half = t_q(tail, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def p_value(diffs: list[float]) -> float:
    return t_p(statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(len(diffs))), len(diffs) - 1)


def holm(ps: list[float]) -> list[dict]:
    """Holm's step-down procedure as docs/study.md states it: sorted by p, the i-th of m (from 1) is rejected if its p
    is at most ALPHA / (m - i + 1) and every one before it was. Per p, in the order given: its step, its level, and
    whether it is rejected."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, rejecting = [{}] * len(ps), True
    for step, i in enumerate(order, 1):
        level = ALPHA / (len(ps) - step + 1)
        rejecting = rejecting and ps[i] <= level
        out[i] = dict(step=step, of=len(ps), level=level, rejected=rejecting)
    return out


def seeds_for_margin(diffs: list[float]) -> int:
    """The fewest seeds whose 95% interval would be at most ±MARGIN wide at this spread (999 at most)."""
    sd = statistics.stdev(diffs)
    return next(m for m in range(2, 1000) if t_q(0.05, m - 1) * sd / math.sqrt(m) <= MARGIN or m == 999)


def assert_interval(text: str, diffs: list[float], tail: float = 0.05):
    """A cell that begins with a paired difference: its mean, and [low, high] at confidence 1 - tail over several
    seeds, or one seed's value and no interval."""
    match = re.match(r"([+-]\d+\.(\d+))(?: \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]| \(one seed: a direction only\))", text)
    assert match, text
    tolerance = 0.5 * 10 ** -len(match[2]) + 1e-9
    mean, low, high = interval(diffs, tail)
    assert abs(float(match[1]) - mean) <= tolerance, (text, diffs)
    if low is None:
        assert match[3] is None, text
    else:
        assert abs(float(match[3]) - low) <= tolerance and abs(float(match[4]) - high) <= tolerance, (text, low, high)


# ----------------------------------------------------------------------------------------------------
# The reader's view of a study: its runs, what stage 1 chose, and each method's runs by N.
def method(args: dict) -> str:
    return "tis" if args.get("tis_cap") is not None else args["loss_type"]


def read_runs(results_dir: str) -> list[dict]:
    """Every run folder of raw/, as its args.json, metrics.jsonl and summary.json say."""
    runs = []
    for args_file in sorted(glob.glob(os.path.join(results_dir, "raw", "*", "args.json"))):
        folder = os.path.dirname(args_file)
        args = json.load(open(args_file))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        # the final gold reward and KL: the mean over the evaluations after version num_steps - eval_every
        final = [e for e in evals if e["eval/version"] > args["num_steps"] - args["eval_every"]]
        assert final and final[-1]["eval/version"] == args["num_steps"] and evals[0]["eval/version"] == 0
        # the paper's N, synchronous: one version samples N batches, trained on at lags 0 .. N - 1
        assert [r["async/lag"] for r in steps] == [i % args["batches_per_round"] for i in range(args["num_steps"])]
        summary = json.load(open(os.path.join(folder, "summary.json")))
        gaps = [g for r in steps if not math.isnan(g := r["async/logprob_gap"])]
        runs.append(
            {
                "args": args,
                "folder": os.path.relpath(folder, results_dir),
                "seed": args["seed"],
                "method": method(args),
                "n": args["batches_per_round"],
                "lr": args["learning_rate"],
                "steps": steps,
                "evals": evals,
                "sft": evals[0]["eval/gold_reward"],
                "gold": statistics.fmean(e["eval/gold_reward"] for e in final),
                "kl": statistics.fmean(e["eval/kl"] for e in final),
                "lag": statistics.fmean(r["async/lag"] for r in steps),
                "gap": statistics.fmean(gaps),
                "wall": summary["wall_time"],
            }
        )
    return runs


def find(runs: list[dict], m: str, n: int, lr: float) -> list[dict]:
    """The runs of method m at this N and learning rate, by seed."""
    return sorted(
        (r for r in runs if r["method"] == m and r["n"] == n and math.isclose(r["lr"], lr, rel_tol=1e-9)),
        key=lambda r: r["seed"],
    )


def stage_1(mode: dict, runs: list[dict], loss: str) -> tuple[list[float], float]:
    """docs/study.md's stage 1 for one loss: the grid's rate with the best mean final gold at N = 1 over the grid's
    seeds (the smaller of a tie); at an end of the grid, the grid grows past it (half the lowest, twice the highest)
    and the rule applies again, at most mode["extensions"] times. The grid as it ended, and the rate."""
    grid = sorted(mode["lrs"])
    for extension in range(mode["extensions"] + 1):
        golds = {}
        for lr in grid:
            on = [r for r in find(runs, loss, 1, lr) if r["seed"] in mode["lr_seeds"]]
            assert [r["seed"] for r in on] == sorted(mode["lr_seeds"]), (loss, lr)
            golds[lr] = statistics.fmean(r["gold"] for r in on)
        best = min(grid, key=lambda lr: (-golds[lr], lr))
        if len(grid) == 1 or best not in (grid[0], grid[-1]) or extension == mode["extensions"]:
            return grid, best
        grid = [grid[0] / 2, *grid] if best == grid[0] else [*grid, grid[-1] * 2]
    raise AssertionError("unreachable")


@dataclass
class Raw:
    text: str  # results.md
    tables: dict  # its tables, parsed
    record: dict  # raw/study.json
    mode: dict
    runs: list
    grids: dict  # {loss: its grid}
    lr: dict  # {loss: its rate}
    by_method: dict  # {method: {N: runs}}


def read_study(results_dir: str) -> Raw:
    text = open(os.path.join(results_dir, "results.md")).read()
    record = json.load(open(os.path.join(results_dir, "raw", "study.json")))
    mode, runs = record["mode_config"], read_runs(results_dir)
    grids, lr = {}, {}
    for loss in LOSSES:
        grids[loss], lr[loss] = stage_1(mode, runs, loss)
    by_method = {loss: {n: find(runs, loss, n, lr[loss]) for n in mode["n"]} for loss in LOSSES}
    by_method["tis"] = {n: find(runs, "tis", n, lr["sigmoid"]) for n in mode["corrected_n"]}
    return Raw(text, parse_tables(text), record, mode, runs, grids, lr, by_method)


def check_runs(raw: Raw):
    """The study ran what docs/study.md says and nothing else: each loss's grid at N = 1 on the grid's seeds, then
    every loss at every N at its rate and online DPO with --tis_cap 2 at its N, on every seed; each run the built-in
    task's 10.6 M policy, 30 SFT steps, k = 2, β 0.1, synchronous, with the mode's length and batch."""
    mode = raw.mode
    want = {(loss, 1, f"{lr:g}", s) for loss in LOSSES for lr in raw.grids[loss] for s in mode["lr_seeds"]}
    want |= {(loss, n, f"{raw.lr[loss]:g}", s) for loss in LOSSES for n in mode["n"] for s in mode["seeds"]}
    want |= {("tis", n, f"{raw.lr['sigmoid']:g}", s) for n in mode["corrected_n"] for s in mode["seeds"]}
    ran = [(r["method"], r["n"], f"{r['lr']:g}", r["seed"]) for r in raw.runs]
    assert sorted(ran) == sorted(want)
    assert sorted(r["folder"] for r in raw.record["runs"]) == sorted(r["folder"] for r in raw.runs)
    words = mode["flags"].split()
    flags = dict(zip(words[::2], words[1::2]))  # the evaluation the final gold and KL read, as every run takes it
    for r in raw.runs:
        a = r["args"]
        assert (a["model_size"], a["sft_steps"], a["num_samples"], a["beta"], a["async_steps"]) == (
            "10m",
            30,
            2,
            0.1,
            0,
        )
        assert (a["num_steps"], a["batch_size"], a["updates_per_batch"]) == (mode["steps"], mode["batch_size"], 1)
        assert a["tis_cap"] == (TIS_CAP if r["method"] == "tis" else None)
        for flag, value in flags.items():
            assert str(a[flag.removeprefix("--")]) == value, (r["folder"], flag)
        assert a["cpu_share_cores"] == (r["n"] == 1 and bool(mode.get("share_cores_at_n1"))), r["folder"]


def check_run_order(record: dict):
    """A study as it ran (not a made-up variant): raw/study.json lists the runs in the order they started."""
    started = [time.strptime(run["started"], "%Y-%m-%d %H:%M:%S %Z") for run in record["runs"]]
    assert started == sorted(started)


def check_stage_table(raw: Raw):
    """Table 1: each loss's rate and its grid's final golds, where its grid's runs stand in the run order, and the
    place of the first N > 1 run, after every grid run."""
    position = {run["folder"]: i for i, run in enumerate(raw.record["runs"], 1)}
    first_stale = min(position[r["folder"]] for r in raw.runs if r["n"] > 1)
    (title,) = [t for t in raw.tables if t.startswith("Table 1.")]
    assert title.endswith(f"(the first N > 1 run is #{first_stale} of {len(raw.runs)})"), title
    rows = raw.tables[title]
    assert list(rows) == [LABELS[loss] for loss in LOSSES]
    every_lr = sorted({lr for grid in raw.grids.values() for lr in grid})
    for loss in LOSSES:
        row = rows[LABELS[loss]]
        assert math.isclose(float(row["learning rate (stage 1)"]), raw.lr[loss], rel_tol=1e-9)
        assert set(row) == {"loss", "learning rate (stage 1)", "its grid's runs, in the run order"} | {
            f"final gold at N = 1, lr {lr:g}" for lr in every_lr
        }
        mine = []
        for lr in every_lr:
            cell = row[f"final gold at N = 1, lr {lr:g}"]
            if lr not in raw.grids[loss]:
                assert cell == "—", (loss, lr, cell)
                continue
            on = [r for r in find(raw.runs, loss, 1, lr) if r["seed"] in raw.mode["lr_seeds"]]
            assert_shows(cell, [r["gold"] for r in on])
            mine += [position[r["folder"]] for r in on]
        assert max(mine) < first_stale
        assert row["its grid's runs, in the run order"] == ", ".join(f"#{i}" for i in sorted(mine))


def gains(raw: Raw, m: str) -> list[float]:
    """Per seed, the final gold at N = 1 minus the SFT gold."""
    return [r["gold"] - r["sft"] for r in raw.by_method[m][1]]


def check_learning_table(raw: Raw) -> dict:
    """Table 2: the learning gate, per method. Returns {method: whether it learns}."""
    rows, learns = table(raw.tables, "Table 2. On-policy"), {}
    assert list(rows) == list(LABELS.values())
    for m, label in LABELS.items():
        row, on = rows[label], raw.by_method[m][1]
        assert math.isclose(float(row["learning rate"]), raw.lr["sigmoid" if m == "tis" else m], rel_tol=1e-9)
        assert row["seeds"] == ", ".join(str(r["seed"]) for r in on)
        assert_shows(row["SFT gold reward"], [r["sft"] for r in on])
        assert_shows(row["final gold reward"], [r["gold"] for r in on])
        assert_interval(row["on-policy gain [95% interval]"], gains(raw, m))
        mean, low, _ = interval(gains(raw, m))
        learns[m] = (mean if low is None else low) > LEARNS
        assert row["learns?"] == ("yes" if learns[m] else "**no**"), (label, row)
    return learns


def check_by_n_tables(raw: Raw):
    """Tables 3, 4, 5 and 8: a quantity of each method at each N (the correction has its own N), and Table 6: the
    paired drop from N = 1 with its interval."""
    for prefix, key in [("Table 3. Final gold", "gold"), ("Table 4. Final KL", "kl"), ("Table 5.", "lag")]:
        rows = table(raw.tables, prefix)
        assert list(rows) == list(LABELS.values())
        for m, by_n in raw.by_method.items():
            for n in raw.mode["n"]:
                cell = rows[LABELS[m]][f"N = {n}"]
                if n in by_n:
                    assert_shows(cell, [r[key] for r in by_n[n]])
                else:
                    assert cell == "—", (prefix, m, n)
    gaps = table(raw.tables, "Table 8.")
    drops = table(raw.tables, "Table 6.")
    assert list(drops) == list(gaps) == list(LABELS.values())
    assert list(next(iter(drops.values()))) == ["method", *[f"N = {n}" for n in raw.mode["n"][1:]]]
    for m, by_n in raw.by_method.items():
        for n in raw.mode["n"]:
            if n not in by_n:
                assert gaps[LABELS[m]][f"N = {n}"] == "—" and drops[LABELS[m]].get(f"N = {n}", "—") == "—"
                continue
            assert_shows(gaps[LABELS[m]][f"N = {n}"], [r["gap"] for r in by_n[n]])
            if n > 1:
                diffs, cell = list(drop(by_n, n).values()), drops[LABELS[m]][f"N = {n}"]
                assert_interval(cell, diffs)
                if len(diffs) > 1:
                    assert cell.endswith(f"; {seeds_for_margin(diffs)} seeds for ±{MARGIN}"), cell


def drop(by_n: dict, n: int) -> dict:
    """{seed: final gold at N = 1 minus final gold at N}."""
    on = {r["seed"]: r for r in by_n[1]}
    return {r["seed"]: on[r["seed"]]["gold"] - r["gold"] for r in by_n[n] if r["seed"] in on}


def drop_difference(more: dict, less: dict, n: int) -> list[float]:
    """Per seed, more's drop to N minus less's: above 0 where `less` loses less."""
    a, b = drop(more, n), drop(less, n)
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def paired(runs: list[dict], reference: list[dict]) -> list[float]:
    """Per seed, a run's final gold minus the reference run's of the same seed."""
    ref = {r["seed"]: r for r in reference}
    return [r["gold"] - ref[r["seed"]]["gold"] for r in runs if r["seed"] in ref]


def check_described_and_every_setting(raw: Raw):
    """Table 7: the final gold at the largest N, online DPO against each other loss and the correction against online
    DPO, paired by seed. Table 9: every setting, with every column."""
    largest, largest_c, dpo = max(raw.mode["n"]), max(raw.mode["corrected_n"]), raw.by_method["sigmoid"]
    described = table(raw.tables, "Table 7.")
    expected = {
        f"online DPO - RLOO, N = {largest}": paired(dpo[largest], raw.by_method["rloo"][largest]),
        f"online DPO - best-of-2 SFT, N = {largest}": paired(dpo[largest], raw.by_method["best_of_k"][largest]),
        f"online DPO + TIS - online DPO, N = {largest_c}": paired(raw.by_method["tis"][largest_c], dpo[largest_c]),
    }
    assert list(described) == list(expected)
    for label, diffs in expected.items():
        row = described[label]
        assert list(row) == ["comparison", "mean difference [95% interval]", f"seeds to resolve ±{MARGIN}"]
        assert_interval(row["mean difference [95% interval]"], diffs)
        assert row[f"seeds to resolve ±{MARGIN}"] == (str(seeds_for_margin(diffs)) if len(diffs) > 1 else "—")

    every = table(raw.tables, "Table 9. Every setting")
    settings = {}
    for r in raw.runs:
        settings.setdefault(r["args"]["exp_name"], []).append(r)
    assert set(every) == set(settings)
    for name, runs in settings.items():
        row, a = every[name], runs[0]["args"]
        runs.sort(key=lambda r: r["seed"])
        assert row["loss"] == LABELS[a["loss_type"]] and row["N"] == str(a["batches_per_round"])
        assert float(row["lr"]) == a["learning_rate"] and row["seeds"] == ", ".join(str(r["seed"]) for r in runs)
        assert row["correction"] == ("--tis_cap 2" if runs[0]["method"] == "tis" else "none")
        for column, key in [
            ("SFT gold reward", "sft"),
            ("final gold reward", "gold"),
            ("final KL", "kl"),
            ("mean lag (updates)", "lag"),
            ("log-prob gap (per token)", "gap"),
            ("wall time (s)", "wall"),
        ]:
            assert_shows(row[column], [r[key] for r in runs])


def verdict_rows(text: str) -> dict:
    """{claim id: its cells} of the verdict table: id, the paper, what it says, the outcome (Holm's), the raw numbers,
    the Holm interval, p."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"\d[a-c]?", cells[0]):
            assert len(cells) == 7, line
            rows[cells[0]] = cells
    return rows


def comparisons(raw: Raw) -> dict:
    """The judged comparisons: {id: (per-seed differences, the methods it rests on, what it says)}."""
    by, largest, largest_c = raw.by_method, max(raw.mode["n"]), max(raw.mode["corrected_n"])
    return {
        "1a": (
            drop_difference(by["rloo"], by["sigmoid"], largest),
            ("sigmoid", "rloo"),
            f"online DPO loses less than RLOO from N = 1 to {largest}",
        ),
        "1b": (
            drop_difference(by["best_of_k"], by["sigmoid"], largest),
            ("sigmoid", "best_of_k"),
            f"online DPO loses less than best-of-2 SFT from N = 1 to {largest}",
        ),
        "5": (
            drop_difference(by["sigmoid"], by["tis"], largest_c),
            ("sigmoid", "tis"),
            f"the correction (--tis_cap 2) reduces online DPO's drop from N = 1 to {largest_c}",
        ),
    }


def check_verdicts(raw: Raw, learns: dict) -> dict:
    """Every verdict from its per-seed differences: not tested where a method it rests on does not learn; with one
    seed, a direction only; else its raw interval and verdict, its p-value, and Holm's step, level, interval and
    verdict over the family of the judged ones. Returns {id: Holm's outcome (raw outcome)}."""
    rows, judged = verdict_rows(raw.text), comparisons(raw)
    assert list(rows) == ["1", *judged]
    tested = {c: all(learns[m] for m in methods) for c, (_, methods, _) in judged.items()}
    family = [c for c in judged if tested[c] and len(judged[c][0]) > 1]
    steps = dict(zip(family, holm([p_value(judged[c][0]) for c in family])))
    found = {}
    for c, (diffs, methods, says) in judged.items():
        _, paper, what, outcome, shown, holm_shown, p = rows[c]
        assert paper == ("new" if c == "5" else "Fig. 4") and what == says
        if not tested[c]:
            why = [
                f"{LABELS[m]}'s on-policy run does not learn by the rule (Table 2)" for m in methods if not learns[m]
            ]
            assert (outcome, shown, holm_shown, p) == ("**not tested here**", "; ".join(why), "", ""), rows[c]
            found[c] = ("not tested here", None)
            continue
        assert_interval(shown, diffs)
        mean, low, high = interval(diffs)
        if low is None:  # one seed: which way it points, and no verdict
            way = "as claimed" if mean > 0 else "against the claim"
            assert (outcome, holm_shown, p) == (f"**undecided** (one seed; it points {way})", "—", "—"), rows[c]
            found[c] = ("undecided", way)
            continue
        raw_outcome = "holds" if low > 0 else "reversed" if high < 0 else "undecided"
        margin = f"{seeds_for_margin(diffs)} seeds would resolve ±0.03 at this spread"
        assert shown.endswith(f", raw verdict: {raw_outcome}; {margin}"), shown
        h = steps[c]
        assert_interval(holm_shown, diffs, tail=h["level"])
        assert holm_shown.endswith(f" (step {h['step']} of {h['of']}, level {h['level']:.4f})"), holm_shown
        assert abs(float(p) - p_value(diffs)) <= 0.5e-4 + 1e-9, (c, p, p_value(diffs))
        holm_outcome = ("holds" if mean > 0 else "reversed") if h["rejected"] else "undecided"
        assert outcome == f"**{holm_outcome}**", (c, rows[c], h)
        found[c] = (holm_outcome, raw_outcome)

    # Claim 1: holds if 1a and 1b hold, reversed if either is, undecided otherwise; not tested if neither is.
    subs = [found["1a"], found["1b"]]
    _, paper, what, outcome, shown, holm_shown, p = rows["1"]
    assert (paper, what, holm_shown, p) == ("Fig. 4", "Online DPO is the most robust to off-policy data", "", "")
    if all(o == "not tested here" for o, _ in subs):
        assert (outcome, shown) == ("**not tested here**", "its sub-claims are not")
        return found | {"1": ("not tested here", None)}
    outcomes = [o for o, _ in subs]
    one = "holds" if all(o == "holds" for o in outcomes) else "reversed" if "reversed" in outcomes else "undecided"
    ways = {way for o, way in subs if way in ("as claimed", "against the claim")}
    if all(way in ("as claimed", "against the claim") for _, way in subs):  # both judged on one seed
        one_seed = f" (one seed; it points {ways.pop()})" if len(ways) == 1 else " (one seed; mixed)"
    else:
        one_seed = ""
    assert (outcome, shown) == (f"**{one}**{one_seed}", "its sub-claims below"), rows["1"]
    return found | {"1": (one, None)}


def check_report(results_dir: str) -> dict:
    """Every table and verdict of results.md, from raw/ alone. Returns the verdicts, as check_verdicts does."""
    return check_study(read_study(results_dir), results_dir)


def check_study(raw: Raw, results_dir: str) -> dict:
    """check_report, on the study read already."""
    check_runs(raw)
    check_stage_table(raw)
    learns = check_learning_table(raw)
    check_by_n_tables(raw)
    check_described_and_every_setting(raw)
    assert [t.split(".")[0] for t in raw.tables] == [f"Table {i}" for i in range(1, 10)]
    verdicts = check_verdicts(raw, learns)
    check_results_json(results_dir, raw)
    return verdicts


def check_results_json(results_dir: str, raw: Raw):
    """results.json, which docs/study.md quotes, says what results.md shows: each table's every cell, each verdict."""
    results = json.load(open(os.path.join(results_dir, "results.json")))
    assert [t["title"] for t in results["tables"]] == list(raw.tables)
    for t in results["tables"]:
        shown = raw.tables[t["title"]]
        assert list(shown) == [row[t["columns"][0]] for row in t["rows"]], t["title"]
        for row in t["rows"]:
            for column in t["columns"][1:]:  # each entry as the report's own renderer shows it
                entry = render(row.get(column, "—"))
                assert shown[row[t["columns"][0]]][column] == entry, (t["title"], column, entry)
    rows = verdict_rows(raw.text)
    assert [c["id"] for c in results["claims"]] == list(rows)
    for c in results["claims"]:
        assert rows[c["id"]][3].startswith(f"**{c['outcome']}**"), (c["id"], c["outcome"], rows[c["id"]])
        if c.get("holm"):
            assert f"(step {c['holm']['step']} of {c['holm']['of']}," in rows[c["id"]][5]


def test_tiny_study_tables_and_verdicts_match_raw_metrics(results_dir):
    verdicts = check_report(results_dir)
    check_run_order(json.load(open(os.path.join(results_dir, "raw", "study.json"))))
    text = open(os.path.join(results_dir, "results.md")).read()
    results = json.load(open(os.path.join(results_dir, "results.json")))
    record = results["study"]
    assert "study.py --tiny" in text and "GiB RAM" in text and f"torch {record['packages']['torch']}" in text
    assert [c["id"] for c in results["claims"]] == ["1", "1a", "1b", "5"] and set(verdicts) == {"1", "1a", "1b", "5"}
    assert all(row for t in results["tables"] for row in t["rows"])
    logs = {os.path.basename(path) for path in glob.glob(os.path.join(results_dir, "logs", "*.log"))}
    assert logs == {f"{r['name']}__{r['seed']}.log" for r in record["runs"]} | {"warm_start.log"}
    for name in PLOTS:
        assert f"({name})" in text
        pixels = matplotlib.image.imread(os.path.join(results_dir, name))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05  # not blank


def test_the_study_prints_the_time_so_far_and_left_after_each_run(tiny_study):
    """After each run: its time, the study's so far, and an estimate of the time left, the runs left (those of the
    stage to come included) times the median run so far."""
    results_dir, stdout = tiny_study
    runs = json.load(open(os.path.join(results_dir, "raw", "study.json")))["runs"]
    pattern = (
        r"done in (\d+)s; (\d+) h (\d\d) min so far; about (\d+) h (\d\d) min left: (\d+) runs at the median (\d+) s"
    )
    lines = re.findall(pattern, stdout)
    assert len(lines) == len(runs), stdout
    so_far = 0
    for i, (took, h, m, left_h, left_m, left, mean) in enumerate(lines, 1):
        assert (
            took == f"{runs[i - 1]['seconds']:.0f}"
            and mean == f"{statistics.median(r['seconds'] for r in runs[:i]):.0f}"
        )
        assert int(left) == len(runs) - i  # the tiny study's stage 2 was counted before it was planned
        assert abs(60 * (60 * int(left_h) + int(left_m)) - int(left) * int(mean)) <= 60 + 0.5 * int(left)
        assert 60 * int(h) + int(m) >= so_far
        so_far = 60 * int(h) + int(m)


def test_the_study_prints_each_verdict_with_its_direction_on_one_seed(tiny_study):
    """The tiny study has one seed: each printed verdict says which way its difference points, as the report does."""
    results_dir, stdout = tiny_study
    rows = verdict_rows(open(os.path.join(results_dir, "results.md")).read())
    for c, cells in rows.items():
        what, outcome = cells[2], cells[3].replace("**", "")
        assert "(one seed; it points" in outcome or "(one seed; mixed)" in outcome or outcome == "not tested here"
        assert f"- {c}. {what}: {outcome}\n" in stdout, (c, outcome, stdout[-1500:])


# ----------------------------------------------------------------------------------------------------
# Copies of the tiny study with more seeds and other gold rewards: the report's arithmetic and rule, on runs that are
# seed 1's.
def shift(name: str, seed: int, what: str, version: int) -> float:
    """A made-up amount in [-0.02, 0.02], fixed by its arguments."""
    return 0.02 * ((zlib.crc32(f"{name}{seed}{what}{version}".encode()) % 201) / 100 - 1)


def rewrite_metrics(folder: str, fn):
    """metrics.jsonl of a run folder, each evaluation after version 0 passed through fn(row) in place."""
    path = os.path.join(folder, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path)]
    for r in rows:
        if r.get("eval/version", 0) > 0:
            fn(r)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def variant(results_dir: str, copy: str, seeds=(2, 3), made_up=True, gold=None) -> str:
    """The tiny study copied, its seed 1 runs copied again as `seeds` (with made_up, their evaluations' gold and KL
    and their wall times moved by made-up amounts that differ by run, seed and version), then every run's gold
    reward at each evaluation after version 0 moved by gold(its args, version). The learning rates stay as chosen:
    only seed 1 is in the grid's seeds."""
    shutil.copytree(results_dir, copy)
    record_path = os.path.join(copy, "raw", "study.json")
    record = json.load(open(record_path))
    for seed in seeds:
        for run in [r for r in record["runs"] if r["seed"] == 1]:
            folder = os.path.join(copy, run["folder"])
            new = folder.replace("__1__", f"__{seed}__")
            shutil.copytree(folder, new)
            args = json.load(open(os.path.join(new, "args.json"))) | {"seed": seed}
            json.dump(args, open(os.path.join(new, "args.json"), "w"))
            if made_up:

                def move(r, name=run["name"], seed=seed):
                    r["eval/gold_reward"] += shift(name, seed, "gold", r["eval/version"])
                    r["eval/kl"] += 5 * shift(name, seed, "kl", r["eval/version"])

                rewrite_metrics(new, move)
                summary = json.load(open(os.path.join(new, "summary.json")))
                summary["wall_time"] *= 1 + 5 * shift(run["name"], seed, "wall", 0)
                json.dump(summary, open(os.path.join(new, "summary.json"), "w"))
            record["runs"].append(run | {"seed": seed, "folder": os.path.relpath(new, copy)})
    if gold is not None:
        for run in record["runs"]:
            args = json.load(open(os.path.join(copy, run["folder"], "args.json")))

            def add(r, args=args):
                r["eval/gold_reward"] += gold(args, r["eval/version"])

            rewrite_metrics(os.path.join(copy, run["folder"]), add)
    record["mode_config"]["seeds"] = [1, *seeds]
    json.dump(record, open(record_path, "w"))
    return copy


def on_policy(amount: float):
    """gold for variant(): `amount` more gold at the final evaluations of every N = 1 run, so that every method learns
    by the rule (0.4) or none does (-0.4), whatever the tiny runs gained. The drops from N = 1 move alike, so the
    differences the claims are judged by stay as the runs gave them."""

    def gold(args: dict, version: int) -> float:
        final = version > args["num_steps"] - args["eval_every"]
        return amount if final and args["batches_per_round"] == 1 else 0.0

    return gold


@pytest.mark.parametrize(
    "seeds, learns",
    [((2, 3), False), ((2, 3), True), ((), True)],
    ids=["3 seeds, none learns", "3 seeds, all learn", "1 seed, all learn"],
)
def test_the_rule_on_more_seeds_and_learning_runs(results_dir, tmp_path, seeds, learns):
    """On three seeds, the intervals, and where every method learns, the p-values and Holm's verdicts; where none
    learns, every claim not tested; on one seed where every method learns, each claim's direction."""
    copy = variant(results_dir, str(tmp_path / "copy"), seeds, gold=on_policy(0.4 if learns else -0.4))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    verdicts = check_report(copy)
    if learns:  # every claim is judged: on one seed, by its direction alone
        assert all(outcome != "not tested here" for outcome, _ in verdicts.values()), verdicts
        directions = [way in ("as claimed", "against the claim") for c, (_, way) in verdicts.items() if c != "1"]
        assert directions == [not seeds] * 3, verdicts
    else:
        assert all(outcome == "not tested here" for outcome, _ in verdicts.values()), verdicts


def test_the_gate_reads_the_intervals_low_end_and_holm_counts_the_tested_claims(results_dir, tmp_path):
    """Made up on three seeds. Each method's on-policy gain has a mean above 0.1 and an interval that reaches below
    it: none learns, so nothing is tested. Then best-of-2 SFT alone does not learn: 1b is not tested, and Holm's
    family is 1a and 5, two comparisons."""

    def spread(args, version):  # the on-policy final evaluations: +0.9, -0.2 and 0 by seed
        final = version > args["num_steps"] - args["eval_every"]
        return {1: 0.9, 2: -0.2, 3: 0.0}[args["seed"]] if final and args["batches_per_round"] == 1 else 0.0

    copy = variant(results_dir, str(tmp_path / "spread"), (2, 3), gold=spread)
    assert study("--report_only", "--results_dir", copy).returncode == 0
    raw = read_study(copy)
    for m in LABELS:
        mean, low, _ = interval(gains(raw, m))
        assert mean > LEARNS > low, (m, mean, low)  # the mean alone would let it learn
    assert all(outcome == "not tested here" for outcome, _ in check_report(copy).values())

    def all_but_best_of_2(args, version):
        amount = -0.4 if args["loss_type"] == "best_of_k" else 0.4
        return on_policy(amount)(args, version)

    copy = variant(results_dir, str(tmp_path / "two"), (2, 3), gold=all_but_best_of_2)
    assert study("--report_only", "--results_dir", copy).returncode == 0
    verdicts = check_report(copy)
    assert verdicts["1b"][0] == "not tested here" and verdicts["1a"][0] != "not tested here" != verdicts["5"][0]
    claims = {c["id"]: c for c in json.load(open(os.path.join(copy, "results.json")))["claims"]}
    assert claims["1a"]["holm"]["of"] == claims["5"]["holm"]["of"] == 2 and "holm" not in claims["1b"]


def with_a_grid(results_dir: str, copy: str) -> str:
    """The tiny study as if its grid had been [5e-5, 1e-4] with one extension: online DPO best at 1e-4, RLOO at 5e-5
    and best-of-2 SFT at 1e-4, each at an end, so each grid grew once; then online DPO's best is 1e-4 inside its grid,
    RLOO's 5e-5 inside its, and best-of-2 SFT's 2e-4, at the end, the extension spent. Each grid run that is not a
    stage-2 one is a copy of its loss's N = 1 run, its final gold moved down, placed before the first N > 1 run; the
    runs at best-of-2 SFT's and RLOO's rates are the tiny study's, relabelled."""
    shutil.copytree(results_dir, copy)
    record_path = os.path.join(copy, "raw", "study.json")
    record = json.load(open(record_path))
    record["mode_config"] |= {"lrs": [5e-5, 1e-4], "extensions": 1}
    added = []
    for loss, lr, down in [
        ("sigmoid", 5e-5, 0.05),
        ("sigmoid", 2e-4, 0.05),
        ("rloo", 1e-4, 0.05),
        ("rloo", 2.5e-5, 0.05),
        ("best_of_k", 5e-5, 0.10),
        ("best_of_k", 1e-4, 0.05),
    ]:
        (source,) = [r for r in record["runs"] if r["loss"] == loss and r["n"] == 1 and not r["tis"] and r["seed"] == 1]
        name_ = source["name"].replace("_lr0.0001_", f"_lr{lr:g}_")
        folder = os.path.join("raw", f"{name_}__1__grid")
        shutil.copytree(os.path.join(copy, source["folder"]), os.path.join(copy, folder))

        args = json.load(open(os.path.join(copy, folder, "args.json")))

        def lower(r, args=args, down=down):
            r["eval/gold_reward"] -= down if r["eval/version"] > args["num_steps"] - args["eval_every"] else 0.0

        rewrite_metrics(os.path.join(copy, folder), lower)
        added.append(source | {"name": name_, "lr": lr, "folder": folder})
    for run in [*record["runs"], *added]:  # every run at its rate: the added ones, and RLOO's and best-of-2 SFT's
        lr = {"rloo": 5e-5, "best_of_k": 2e-4}.get(run["loss"], 1e-4) if run not in added else run["lr"]
        run |= {"name": run["name"].replace("_lr0.0001_", f"_lr{lr:g}_"), "lr": lr}
        run["flags"] = [f"{lr:g}" if f == "0.0001" else f for f in run["flags"]]
        args_file = os.path.join(copy, run["folder"], "args.json")
        json.dump(json.load(open(args_file)) | {"learning_rate": lr, "exp_name": run["name"]}, open(args_file, "w"))
    first_stale = next(i for i, r in enumerate(record["runs"]) if r["n"] > 1)
    record["runs"][first_stale:first_stale] = added
    json.dump(record, open(record_path, "w"))
    return copy


def test_stage_1_in_the_report_with_grids_that_grew(results_dir, tmp_path):
    """Table 1 where each loss's grid grew once, and the grids differ: each loss's rate, its grid's final golds (a
    rate outside its grid shows none), its runs' places, all before the first N > 1 run."""
    copy = with_a_grid(results_dir, str(tmp_path / "copy"))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(copy)
    raw = read_study(copy)
    assert raw.lr == {"sigmoid": 1e-4, "rloo": 5e-5, "best_of_k": 2e-4}
    assert raw.grids == {"sigmoid": [5e-5, 1e-4, 2e-4], "rloo": [2.5e-5, 5e-5, 1e-4], "best_of_k": [5e-5, 1e-4, 2e-4]}
    rows = table(raw.tables, "Table 1.")
    assert (
        rows["RLOO"]["final gold at N = 1, lr 0.0002"] == rows["online DPO"]["final gold at N = 1, lr 2.5e-05"] == "—"
    )


def designed(results_dir: str, copy: str, d1a: list, d1b: list, d5: list) -> str:
    """The tiny study on seeds 1, 2 and 3, its final gold rewards set so that per seed, the differences of drops that
    claims 1a, 1b and 5 are judged by are these: online DPO's drop is 0.02, 0.03, 0.04 by seed, RLOO's that plus d1a,
    best-of-2 SFT's that plus d1b, and the correction's that minus d5. Each N = 1 run gains 0.3 or more."""
    base = {r["args"]["exp_name"]: r for r in read_runs(results_dir)}  # seed 1's runs: every seed's copy
    dpo = [0.02, 0.03, 0.04]
    drops = {
        "sigmoid": dpo,
        "rloo": [a + b for a, b in zip(dpo, d1a)],
        "best_of_k": [a + b for a, b in zip(dpo, d1b)],
        "tis": [a - b for a, b in zip(dpo, d5)],
    }

    def gold(args, version):
        if version <= args["num_steps"] - args["eval_every"]:
            return 0.0
        run, seed = base[args["exp_name"]], args["seed"]
        target = (
            run["sft"] + 0.3 + 0.01 * seed - (drops[method(args)][seed - 1] if args["batches_per_round"] > 1 else 0)
        )
        return target - run["gold"]

    return variant(results_dir, copy, (2, 3), made_up=False, gold=gold)


@pytest.mark.parametrize(
    "d1a, d1b, d5, expected",
    [
        # 1b's p (0.003) is below step 1's level (0.05 / 3): reversed. 1a's p (0.03) is below 0.05, so its raw
        # interval lies above 0, but above step 2's level (0.025): Holm leaves it undecided. 5's p is large.
        (
            [0.0226, 0.0326, 0.0426],
            [-0.10, -0.11, -0.12],
            [-0.02, 0.01, 0.04],
            {"1a": ("undecided", "holds"), "1b": ("reversed", "reversed"), "5": ("undecided", "undecided")}
            | {"1": ("reversed", None)},
        ),
        # Every p below its step's level: each holds, and so does claim 1.
        (
            [0.10, 0.11, 0.12],
            [0.09, 0.10, 0.12],
            [0.05, 0.06, 0.08],
            {"1a": ("holds", "holds"), "1b": ("holds", "holds"), "5": ("holds", "holds"), "1": ("holds", None)},
        ),
    ],
    ids=["Holm undecides a raw verdict", "all hold"],
)
def test_holms_verdicts_on_differences_made_to_order(results_dir, tmp_path, d1a, d1b, d5, expected):
    copy = designed(results_dir, str(tmp_path / "copy"), d1a, d1b, d5)
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_report(copy) == expected
    raw = read_study(copy)  # the differences came out as made
    for c, diffs in (("1a", d1a), ("1b", d1b), ("5", d5)):
        assert comparisons(raw)[c][0] == pytest.approx(diffs, abs=1e-9)


def test_the_readers_holm_and_t_on_hand_cases():
    """The reader's own tools, against cases worked by hand and Student's t as tables print it."""
    # m = 3: levels 0.05/3, 0.05/2, 0.05 at steps 1, 2, 3, in the order of p
    assert [h["rejected"] for h in holm([0.04, 0.001, 0.02])] == [True, True, True]
    assert [h["step"] for h in holm([0.04, 0.001, 0.02])] == [3, 1, 2]
    assert [h["rejected"] for h in holm([0.01, 0.03, 0.04])] == [True, False, False]  # 0.03 > 0.025 stops it
    # 0.02 > 0.05 / 3 at step 1: none is rejected, though each is below 0.05
    assert [h["rejected"] for h in holm([0.02, 0.03, 0.04])] == [False, False, False]
    assert [h["rejected"] for h in holm([0.2, 0.001])] == [False, True]
    assert [h["rejected"] for h in holm([0.03, 0.01])] == [True, True]  # 0.01 ≤ 0.025, then 0.03 ≤ 0.05
    assert holm([0.5])[0] == dict(step=1, of=1, level=0.05, rejected=False)
    for dof, printed in {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 30: 2.042}.items():
        assert abs(t_q(0.05, dof) - printed) < 1e-3, dof
    assert abs(t_q(0.01, 4) - 4.604) < 1e-3 and abs(t_q(0.05, 1) - math.tan(math.pi * 0.475)) < 1e-9
    assert abs(t_p(2.776445, 4) - 0.05) < 1e-6 and t_p(0, 3) == pytest.approx(1)
    assert t_p(1.0, 2) == pytest.approx(1 - 1 / math.sqrt(3), abs=1e-12)  # dof 2: P(|T| ≥ t) = 1 - t / √(t² + 2)


def test_the_studys_t_functions_are_students_t():
    """The study's t quantile and p-value (an incomplete beta by continued fraction) against the reader's, integrated
    from the density: at the 95% interval for 2 to 15 seeds, at Holm's levels, and far in the tails."""
    for dof in range(1, 15):
        assert S.t_quantile(0.95, dof) == pytest.approx(t_q(0.05, dof), rel=1e-6), dof
        for level in (ALPHA / 3, ALPHA / 2):
            assert S.t_quantile(1 - level, dof) == pytest.approx(t_q(level, dof), rel=1e-6), (dof, level)
    for dof in (1, 2, 3, 4, 7, 14, 40):
        for t in (0.0, 0.05, 0.7, 1.0, 2.5, 4.3, 9.0, 30.0, -3.0):
            assert S.t_two_sided_p(t, dof) == pytest.approx(t_p(t, dof), abs=1e-9), (t, dof)


# ----------------------------------------------------------------------------------------------------
# The stage rules on made-up runs: the full study's plan from its finished runs alone.
def fake_groups(golds: dict) -> dict:
    """groups as the study loads them, for its rules alone: {name: [a run per seed]} with a final gold reward (of the
    full mode's last version); the rules read nothing else."""
    groups = {}
    for (name, seed), gold in golds.items():
        evals = [{"eval/version": 0, "eval/gold_reward": 0.5}, {"eval/version": 256, "eval/gold_reward": gold}]
        groups.setdefault(name, []).append({"seed": seed, "evals": evals, "args": {"num_steps": 256, "eval_every": 64}})
    return groups


def name(loss: str, n: int, lr: float, tis=False) -> str:
    """A run's --exp_name, as the study names its settings."""
    return f"{loss}{'_tis' * tis}_lr{lr:g}_N{n}_steps256"


def keys(runs: list[dict]) -> list[tuple]:
    return [(r["name"], r["seed"]) for r in runs]


def test_the_stages_choose_each_rate_on_policy_then_run_the_rest():
    """Stage 1: each loss's grid at N = 1 on seeds 1 and 2, seed by seed, and nothing else until every rate is
    chosen; a best rate at an end of the grid extends it past that end, at most twice. Stage 2: every loss at
    every N at its rate, and online DPO + TIS at its N, on seeds 1 to 5, seed by seed, each run once: 102 runs in
    all without an extension, two more for each."""
    mode = S.MODES["full"]
    grid = [(name(loss, 1, lr), seed) for seed in (1, 2) for loss in LOSSES for lr in (2.5e-5, 5e-5, 1e-4)]
    assert keys(S.plan(mode, {})) == grid and S.expected_runs(mode, {}) == 102

    # Online DPO ties 5e-5 with 1e-4 (the smaller is taken), the others are best at 5e-5: no extension.
    best = {"sigmoid": (5e-5, 1e-4), "rloo": (5e-5,), "best_of_k": (5e-5,)}
    golds = {}
    for loss in LOSSES:
        for lr in (2.5e-5, 5e-5, 1e-4):
            for seed in (1, 2):
                golds[(name(loss, 1, lr), seed)] = 0.7 if lr in best[loss] else 0.6
    for missing in grid:  # a grid run not finished: its loss's rate is not chosen, and nothing else is planned
        partial = fake_groups({k: v for k, v in golds.items() if k != missing})
        assert keys(S.plan(mode, partial)) == grid and S.expected_runs(mode, partial) == 102
    groups = fake_groups(golds)
    assert S.choose_lr(mode, groups) == {"sigmoid": 5e-5, "rloo": 5e-5, "best_of_k": 5e-5}
    planned = S.plan(mode, groups)
    stage_2 = {(name(loss, n, 5e-5), s) for loss in LOSSES for n in (1, 2, 4, 8, 16) for s in range(1, 6)}
    stage_2 |= {(name("sigmoid", n, 5e-5, tis=True), s) for n in (1, 4, 16) for s in range(1, 6)}
    assert keys(planned)[: len(grid)] == grid and len(set(keys(planned))) == len(planned) == 102
    assert set(keys(planned)[len(grid) :]) == stage_2 - set(grid)
    later = [r["seed"] for r in planned[len(grid) :]]
    assert later == sorted(later)  # seed by seed
    assert S.expected_runs(mode, groups) == 102

    # Online DPO best at the lowest rate three times: the grid grows to 1.25e-5, then 6.25e-6, and there it stops.
    # RLOO best at the highest: 2e-4 is added, and loses to 1e-4.
    def add(loss, lr, gold):
        for seed in (1, 2):
            golds[(name(loss, 1, lr), seed)] = gold

    add("sigmoid", 2.5e-5, 0.8)
    add("rloo", 1e-4, 0.8)
    planned = S.plan(mode, fake_groups(golds))
    added = [(name("sigmoid", 1, 1.25e-5), 1), (name("rloo", 1, 2e-4), 1)]
    added += [(name("sigmoid", 1, 1.25e-5), 2), (name("rloo", 1, 2e-4), 2)]
    assert set(keys(planned)) == set(grid) | set(added) and {r["n"] for r in planned} == {1}
    assert S.expected_runs(mode, fake_groups(golds)) == 106  # each open grid taken to need no further extension
    add("sigmoid", 1.25e-5, 0.9)
    add("rloo", 2e-4, 0.5)
    assert S.choose_lr(mode, fake_groups(golds)) == {"rloo": 1e-4, "best_of_k": 5e-5}
    assert (name("sigmoid", 1, 6.25e-6), 2) in keys(S.plan(mode, fake_groups(golds)))
    assert {r["n"] for r in S.plan(mode, fake_groups(golds))} == {1}
    add("sigmoid", 6.25e-6, 0.95)  # the extensions are spent: the end is taken
    groups = fake_groups(golds)
    assert S.choose_lr(mode, groups) == {"sigmoid": 6.25e-6, "rloo": 1e-4, "best_of_k": 5e-5}
    planned = S.plan(mode, groups)
    assert len(set(keys(planned))) == len(planned) == S.expected_runs(mode, groups) == 102 + 2 * 3
    grid_runs = [k for k in keys(planned) if k[0].endswith("_N1_steps256") and "_tis" not in k[0] and k[1] <= 2]
    assert keys(planned)[: len(grid_runs)] == grid_runs  # every grid run first
    rates = {"sigmoid": 6.25e-6, "rloo": 1e-4, "best_of_k": 5e-5}
    stage_2 = {(name(loss, n, rates[loss]), s) for loss in LOSSES for n in (1, 2, 4, 8, 16) for s in range(1, 6)}
    stage_2 |= {(name("sigmoid", n, 6.25e-6, tis=True), s) for n in (1, 4, 16) for s in range(1, 6)}
    assert set(keys(planned)) == set(grid_runs) | stage_2 and len(grid_runs) == 2 * (5 + 4 + 3)


# ----------------------------------------------------------------------------------------------------
# The tiny study's runs themselves, and the study as a user runs it.
def test_study_report_is_rebuilt_from_raw_alone(results_dir, tmp_path):
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    original = open(os.path.join(copy, "results.md")).read()
    for name_ in ["results.md", "results.json", *PLOTS]:
        os.remove(os.path.join(copy, name_))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(os.path.join(copy, "results.md")).read() == original
    result = study("--tiny", "--results_dir", copy, timeout=60)
    assert result.returncode != 0 and "already holds runs" in result.stderr


def test_rloo_off_policy_has_a_ratio_away_from_1_and_on_policy_does_not(results_dir):
    """RLOO's π_old is vLLM's log-prob of each sampled token: with the paper's N = 2, a batch trained at lag 0 has
    π_θ = π_old, so ρ = 1 up to float error and nothing is clipped; at lag 1 the policy has moved, and ρ with it."""
    (run,) = [r for r in read_runs(results_dir) if r["method"] == "rloo" and r["n"] == 2]
    steps, evals = run["steps"], run["evals"]
    assert [s["async/lag"] for s in steps] == [0, 1, 0, 1]
    for s in steps:
        if s["async/lag"] == 0:
            assert abs(s["rloo/ratio"] - 1) < 1e-4 and s["rloo/clipped_frac"] == 0 and s["async/logprob_gap"] < 1e-4
        else:
            assert abs(s["rloo/ratio"] - 1) > 1e-4 and s["async/logprob_gap"] > 1e-3
        assert s["rloo/advantage_std"] > 0 and "rewards/dpo_margin" not in s
    # The KL is the sampling policy's to the reference: version 0 is the reference, so float error; later, not.
    assert abs(evals[0]["eval/kl"]) < 1e-4 and abs(steps[0]["objective/kl"]) < 1e-4
    assert max(e["eval/kl"] for e in evals) > 1e-3


def test_the_correction_weighs_each_pair_by_its_capped_ratio(results_dir):
    """online DPO + TIS logs each pair of each step: [log π_θ of the pair, the same under the sampler, its weight].
    The weight is min(2, π_θ/μ) of the pair: 1 at lag 0 up to float error, away from 1 at lag 1 (N = 2). The
    uncorrected runs log neither the pairs nor the weight."""
    runs = read_runs(results_dir)
    (corrected,) = [r for r in runs if r["method"] == "tis" and r["n"] == 2]
    assert "sigmoid_tis_" in corrected["folder"] and "_N2_" in corrected["folder"]
    moved = []
    for s in corrected["steps"]:
        assert s["pairs"], s["step"]
        for a, b, ratio in s["pairs"]:
            assert ratio == pytest.approx(min(TIS_CAP, math.exp(a - b)), rel=1e-5), (a, b, ratio)
            if s["async/lag"] == 0:
                assert abs(ratio - 1) < 1e-3, (s["step"], ratio)
            else:
                moved.append(abs(ratio - 1))
        assert s["offpolicy/tis_ratio"] == pytest.approx(statistics.fmean(w for *_, w in s["pairs"]), rel=1e-5)
    assert moved and max(moved) > 0.01
    (on_policy,) = [r for r in runs if r["method"] == "tis" and r["n"] == 1]
    assert all(abs(w - 1) < 1e-3 for s in on_policy["steps"] for *_, w in s["pairs"])
    for r in runs:
        if r["method"] == "sigmoid":
            assert all("pairs" not in s and "offpolicy/tis_ratio" not in s for s in r["steps"]), r["folder"]


def test_an_interrupted_study_resumes_with_only_its_missing_run(results_dir, cache_dir, tmp_path):
    """A full study takes hours: --resume keeps the runs study.json lists, deletes what an interrupted run left, and
    runs only the missing ones."""
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    record_path = os.path.join(copy, "raw", "study.json")
    record = json.load(open(record_path))
    *kept_runs, last = record["runs"]
    os.remove(os.path.join(copy, last["folder"], "summary.json"))  # as if killed before its end
    json.dump(record | {"runs": kept_runs}, open(record_path, "w"))
    before = {r["folder"]: os.path.getmtime(os.path.join(copy, r["folder"], "metrics.jsonl")) for r in kept_runs}
    result = study("--tiny", "--resume", "--results_dir", copy, "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("done in") == 1 and last["name"] in result.stdout
    resumed = json.load(open(record_path))
    assert [(r["name"], r["seed"]) for r in resumed["runs"]] == [(r["name"], r["seed"]) for r in record["runs"]]
    assert len(resumed["resumed"]) == 1
    for folder, mtime in before.items():
        assert os.path.getmtime(os.path.join(copy, folder, "metrics.jsonl")) == mtime
    assert len(glob.glob(os.path.join(copy, "raw", f"{last['name']}__{last['seed']}__*"))) == 1
    check_report(copy)

    empty = str(tmp_path / "empty")
    result = study("--tiny", "--resume", "--results_dir", empty, timeout=60)
    assert result.returncode != 0 and "--resume found no" in result.stderr


def test_the_study_commands_run_as_printed(tmp_path):
    """`python benchmark/study.py --tiny` as docs/study.md prints it, in the repository: it writes a new folder
    runs/study_tiny_{date-time} and says where (here it stops in its first run, on a broken cached model; what it
    wrote is deleted). `--resume` goes on with the newest study of its mode under runs/ and says which; where there
    is none, it says how to name one."""
    cache = broken_cache(tmp_path, "10m")
    runs_existed = os.path.isdir(RUNS)
    result = study("--tiny", "--cache_dir", cache, timeout=300)
    made = sorted(set(re.findall(r"runs/study_tiny_\d{8}-\d{6}", result.stdout)))
    try:
        assert "already holds runs" not in result.stderr, result.stderr[-3000:]
        assert result.returncode != 0 and "error: exit code" in result.stderr and "sync_baseline.py" in result.stderr
        assert len(made) == 1 and os.path.exists(os.path.join(ROOT, made[0], "raw", "study.json"))
    finally:
        clean_up_runs(made, runs_existed)

    # Elsewhere: the default folders are relative to where the study runs.
    def study_in(cwd, *flags):
        return subprocess.run([sys.executable, STUDY_PY, *flags], cwd=cwd, capture_output=True, text=True, timeout=120)

    for folder in ["study_tiny_20000101-000000", "study_tiny_20010101-000000", "study_quick_20990101-000000"]:
        (tmp_path / "here" / "runs" / folder).mkdir(parents=True)
    result = study_in(tmp_path / "here", "--tiny", "--resume")
    assert "runs/study_tiny_20010101-000000" in result.stdout, result.stdout + result.stderr
    assert (
        result.returncode != 0 and "--resume found no runs/study_tiny_20010101-000000/raw/study.json" in result.stderr
    )
    (tmp_path / "empty").mkdir()
    result = study_in(tmp_path / "empty", "--tiny", "--resume")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "--results_dir" in lines[0], result.stderr


def test_ctrl_c_stops_the_study_and_says_how_to_resume_it(cache_dir, tmp_path):
    marker = uuid.uuid4().hex
    results = str(tmp_path / "results")
    p = start(STUDY_PY, None, None, "--tiny", "--results_dir", results, "--cache_dir", cache_dir, marker=marker)
    line = interrupt(p, "[1/", marker)  # its first training run is under way
    assert "--resume" in line and f"--results_dir {results}" in line and f"--cache_dir {cache_dir}" in line, line
    assert "--tiny" in line and os.path.exists(os.path.join(results, "raw", "study.json"))


def test_resuming_a_finished_study_runs_nothing_and_rebuilds_its_report(results_dir, cache_dir, tmp_path):
    """--resume on a study with no run left to do says so: it builds no warm start and runs nothing, so raw/ and
    logs/ stay as they were, and it rebuilds results.md as it was."""
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    original = open(os.path.join(copy, "results.md")).read()
    os.remove(os.path.join(copy, "results.md"))

    def files() -> dict:
        paths = glob.glob(os.path.join(copy, "raw", "**"), recursive=True)
        paths += glob.glob(os.path.join(copy, "logs", "**"), recursive=True)
        return {p: (os.stat(p).st_mtime_ns, open(p, "rb").read()) for p in paths if os.path.isfile(p)}

    before = files()
    result = study("--tiny", "--resume", "--results_dir", copy, "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "nothing left to run" in result.stdout
    assert "warm start" not in result.stdout and "[1/" not in result.stdout and "done in" not in result.stdout
    assert files() == before
    assert open(os.path.join(copy, "results.md")).read() == original


def test_the_committed_study_tables_and_verdicts_match_its_raw_metrics():
    """The full study docs/study.md quotes, recomputed from its raw/ by the reader's script above, under the rule as
    the page states it (not as the record says): 5 seeds, N = 1 to 16 in 256 updates of 8 prompts, the correction at
    N = 1, 4 and 16, each loss's grid from 2.5e-5 to 1e-4 on seeds 1 and 2 with two extensions at most; the final
    gold the mean of versions 208 to 256; at N = 16 a mean lag of 7.5 updates, from the runs' own logs."""
    path = os.path.join(ROOT, "benchmark", "study_results")
    raw = read_study(path)
    assert raw.mode == {
        "seeds": [1, 2, 3, 4, 5],
        "steps": 256,
        "batch_size": 8,
        "n": [1, 2, 4, 8, 16],
        "corrected_n": [1, 4, 16],
        "flags": "--eval_every 64 --eval_every_at_end 16",
        "lrs": [2.5e-05, 5e-05, 0.0001],
        "extensions": 2,
        "lr_seeds": [1, 2],
        "share_cores_at_n1": True,
    }
    check_study(raw, path)
    check_run_order(raw.record)
    for r in raw.runs:
        assert r["args"]["eval_prompts"] == 256
        final = [e["eval/version"] for e in r["evals"] if e["eval/version"] > 256 - 64]
        assert final == [208, 224, 240, 256], r["folder"]
        if r["n"] == 16:
            assert r["lag"] == 7.5, r["folder"]


def test_the_committed_study_report_is_rebuilt_as_committed(tmp_path):
    """benchmark/study_results, the full study docs/study.md quotes: --report_only gives its results.md back from
    raw/."""
    check_committed_report_rebuilds("study.py", "study_results", tmp_path)
