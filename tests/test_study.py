"""The off-policy study end to end in its tiny configuration (about 3 minutes): every number in its results.md must be
the one the raw run folders give, recomputed here from args.json, metrics.jsonl and summary.json without the study's
code, and every verdict must follow from those numbers."""

import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import uuid
import zlib
from functools import partial

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
import study as S  # noqa: E402  (its plan and its rules, for the tests that need no run)


def study(*flags, timeout=600):
    return run_script(STUDY_PY, None, None, *flags, timeout=timeout)


PLOTS = ["losses.png", "sizes.png", "drift.png", "updates_per_batch.png", "num_samples.png"]
MARGIN = 0.03  # docs/study.md's: the smallest difference in final gold reward that matters


@pytest.fixture(scope="module")
def results_dir(cache_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("study"))
    result = study("--tiny", "--results_dir", path, "--cache_dir", cache_dir, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path


# ----------------------------------------------------------------------------------------------------
# A reader's own script: every table and verdict of results.md, recomputed from raw/ without the study's code.
def t_quantile(dof: int) -> float:
    """Student's t two-sided 95% quantile, by bisection on its CDF, integrated numerically from the density."""

    def cdf(x):
        c = math.gamma((dof + 1) / 2) / (math.sqrt(dof * math.pi) * math.gamma(dof / 2))
        n, h = 20000, x / 20000
        return 0.5 + h * sum(c * (1 + ((i + 0.5) * h) ** 2 / dof) ** (-(dof + 1) / 2) for i in range(n))

    lo, hi = 0.0, 20.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return lo


def read_runs(results_dir: str) -> dict:
    """{exp_name: [runs, by seed]}, each run what its args.json, metrics.jsonl and summary.json say."""
    groups = {}
    for args_file in glob.glob(os.path.join(results_dir, "raw", "*", "args.json")):
        folder = os.path.dirname(args_file)
        args = json.load(open(args_file))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        final = [e for e in evals if e["eval/version"] > args["num_steps"] - args["eval_every"]]
        assert final and final[-1]["eval/version"] == args["num_steps"]
        if args["async_steps"] == 0:  # the study's off-policy runs: the paper's N, synchronous
            assert [r["async/lag"] for r in steps] == [i % args["batches_per_round"] for i in range(len(steps))]
        summary = json.load(open(os.path.join(folder, "summary.json")))
        gaps = [g for r in steps if not math.isnan(g := r["async/logprob_gap"])]
        run = {
            "args": args,
            "seed": args["seed"],
            "evals": evals,
            "sft": evals[0]["eval/gold_reward"],
            "gold": statistics.fmean(e["eval/gold_reward"] for e in final),
            "kl": statistics.fmean(e["eval/kl"] for e in final),
            "curve": statistics.fmean(e["eval/gold_reward"] for e in evals[1:]),
            "lag": statistics.fmean(r["async/lag"] for r in steps),
            "gap": statistics.fmean(gaps),
            "wall": summary["wall_time"],
            "step": statistics.fmean(r["time/step"] for r in steps[1:]) if len(steps) > 1 else summary["time_per_step"],
            "G": summary["generate_per_step"],
            "T": summary["train_per_step"],
        }
        groups.setdefault(args["exp_name"], []).append(run)
    return {name: sorted(runs, key=lambda r: r["seed"]) for name, runs in groups.items()}


def values(runs, key):
    return [r[key] for r in runs]


def by_seed(runs):
    return {r["seed"]: r for r in runs}


def rule(diffs: list[float], claim: str) -> tuple:
    """(outcome, low, high) of the rule of docs/study.md for these per-seed differences."""
    if len(diffs) < 2:
        return "undecided", None, None
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    low, high = statistics.fmean(diffs) - half, statistics.fmean(diffs) + half
    if claim == "<":
        return ("holds" if high < 0 else "reversed" if low > 0 else "undecided"), low, high
    bar = -MARGIN if claim == ">=" else 0.0
    return ("holds" if low > bar else "reversed" if high < bar else "undecided"), low, high


def assert_interval(text: str, diffs: list[float]):
    """A cell or verdict that shows a paired difference: its mean, and [low, high] over several seeds."""
    match = re.match(r"([+-]\d+\.(\d+))(?: \[([+-]\d+\.\d+), ([+-]\d+\.\d+)\]| \(one seed: a direction only\))", text)
    assert match, text
    tolerance = 0.5 * 10 ** -len(match[2]) + 1e-9
    assert abs(float(match[1]) - statistics.fmean(diffs)) <= tolerance, (text, diffs)
    _, low, high = rule(diffs, ">")
    if low is None:
        assert match[3] is None, text
    else:  # the study's t table has 3 decimals: allow for that too
        slack = tolerance + 2e-3 * statistics.stdev(diffs) / math.sqrt(len(diffs))
        assert abs(float(match[3]) - low) <= slack and abs(float(match[4]) - high) <= slack, (text, diffs, low)


def combine(outcomes):
    return "holds" if all(o == "holds" for o in outcomes) else "reversed" if "reversed" in outcomes else "undecided"


def verdict_rows(text: str) -> dict:
    """{claim id: (outcome, the numbers cell, the outcome cell)} from the verdict table of results.md."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and re.fullmatch(r"\d[a-c]?", cells[0]):
            rows[cells[0]] = (re.match(r"\*\*([a-z ]+)\*\*", cells[3])[1], cells[4], cells[3])
    return rows


def drops(by_n, n):
    """Per seed, final gold at N = 1 minus final gold at N."""
    on_policy = by_seed(by_n[1])
    return {r["seed"]: on_policy[r["seed"]]["gold"] - r["gold"] for r in by_n[n] if r["seed"] in on_policy}


def drop_difference(more, less, largest):
    a, b = drops(more, largest), drops(less, largest)
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def paired(runs, reference, fn):
    ref = by_seed(reference)
    return [fn(r, ref[r["seed"]]) for r in runs if r["seed"] in ref]


def kl_at(run, gold):
    for before, e in zip(run["evals"], run["evals"][1:]):
        if e["eval/gold_reward"] >= gold:
            lo, hi = before["eval/gold_reward"], e["eval/gold_reward"]
            w = min(1.0, max(0.0, (gold - lo) / (hi - lo))) if hi > lo else 1.0
            return before["eval/kl"] + w * (e["eval/kl"] - before["eval/kl"])


def check_claim(verdicts, claim_id, diffs, claim):
    """The verdict row says what the rule makes of these differences, and shows their mean and interval."""
    outcome, shown, cell = verdicts[claim_id]
    assert outcome == rule(diffs, claim)[0], (claim_id, outcome, diffs)
    assert_interval(shown, diffs)
    if len(diffs) == 1:  # one seed: which way it points, as the paper claims or not
        d = diffs[0]
        side = d < 0 if claim == "<" else d > (-MARGIN if claim == ">=" else 0)
        assert f"it points {'as' if side else 'against'} the paper" in cell, (claim_id, cell, d)
    return outcome


def check_report(results_dir: str):
    text = open(os.path.join(results_dir, "results.md")).read()
    tables = parse_tables(text)
    groups = read_runs(results_dir)
    mode = json.load(open(os.path.join(results_dir, "raw", "study.json")))["mode_config"]
    steps, ns = mode["steps"], mode["n"]
    loss_names = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT"}
    size_names = {"3m": "2.7 M", "10m": "10.6 M", "30m": "29.0 M"}

    def find(loss="sigmoid", size="10m", n=1, e=1, k=2, num_steps=steps, lr=1e-4, sft=30, async_steps=0):
        """The runs with these flags (the study's batch size and flags otherwise)."""
        want = dict(loss_type=loss, model_size=size, batches_per_round=n, updates_per_batch=e, num_samples=k)
        want |= dict(num_steps=num_steps, learning_rate=lr, sft_steps=sft, async_steps=async_steps)
        want |= dict(batch_size=mode["batch_size"])
        (name,) = [x for x, runs in groups.items() if all(runs[0]["args"][key] == v for key, v in want.items())]
        return groups[name]

    every_run = [r for runs in groups.values() for r in runs]

    # Every setting, with every column.
    every = table(tables, f"Table {len(tables)}. Every setting")
    assert set(every) == set(groups)
    for name, row in every.items():
        runs, a = groups[name], groups[name][0]["args"]
        assert row["size"] == size_names[a["model_size"]] and row["N"] == str(a["batches_per_round"])
        assert row["E"] == str(a["updates_per_batch"]) and row["k"] == str(a["num_samples"])
        assert float(row["lr"]) == a["learning_rate"] and row["SFT steps"] == str(a["sft_steps"])
        assert row["updates"] == str(a["num_steps"] * a["updates_per_batch"])
        for column, key in [
            ("SFT gold reward", "sft"),
            ("final gold reward", "gold"),
            ("final KL", "kl"),
            ("mean gold over the run", "curve"),
            ("mean lag (updates)", "lag"),
            ("log-prob gap (per token)", "gap"),
            ("wall time (s)", "wall"),
            ("s/step", "step"),
            ("G (s/step)", "G"),
            ("T (s/step)", "T"),
        ]:
            assert_shows(row[column], values(runs, key))

    # Stage 1: the warm starts. 10.6 M keeps the default run's 30 SFT steps, a smaller size gets the grid's first
    # value, and a larger one the fewest SFT steps whose probe (one update) starts at least as high as the next
    # smaller size's. Stage 2: each size's learning rate, the grid's best mean final gold on-policy over its seeds.
    sizes = [s for s in size_names if s in mode["sizes"]]
    probes = {
        (r["args"]["model_size"], r["args"]["sft_steps"]): r["sft"] for r in every_run if r["args"]["num_steps"] == 1
    }
    sft = {size: mode["sft_steps"][0] for size in sizes} | {"10m": 30}
    if len(mode["sft_steps"]) == 1:
        assert not probes
    for smaller, size in zip(sizes[sizes.index("10m") :], sizes[sizes.index("10m") + 1 :]):
        if len(mode["sft_steps"]) > 1:
            sft[size] = next(x for x in mode["sft_steps"] if probes[(size, x)] >= probes[(smaller, sft[smaller])])
    stages = table(tables, "Table 1")
    for (size, steps_), gold in probes.items():
        assert_shows(stages[size_names[size]][f"SFT gold, {steps_} SFT steps"], [gold])
    lr = {}
    for size in mode["sizes"]:
        grid = {
            x: [r for r in find(size=size, lr=x, sft=sft[size]) if r["seed"] in mode["lr_seeds"]] for x in mode["lrs"]
        }
        lr[size] = max(grid, key=lambda x: statistics.fmean(values(grid[x], "gold")))
        row = stages[size_names[size]]
        assert float(row["learning rate (stage 2)"]) == lr[size] and row["SFT steps (stage 1)"] == str(sft[size])
        for x, runs in grid.items():
            assert_shows(row[f"final gold at N = 1, lr {x:g}"], values(runs, "gold"))

    # Robustness by loss and by size: each N's final gold and KL, and the paired drop from N = 1.
    def robustness(title, labels, runs_of):
        rows = table(tables, title)
        assert list(rows) == list(labels.values())
        for x, label in labels.items():
            row, by_n = rows[label], {n: runs_of(x, n) for n in ns}
            gains = [r["gold"] - r["sft"] for r in by_n[1]]
            assert_shows(row["on-policy gain (final gold at N = 1 - SFT gold)"], gains)
            for n in ns:
                assert_shows(row[f"final gold, N = {n}"], values(by_n[n], "gold"))
                assert_shows(row[f"final KL, N = {n}"], values(by_n[n], "kl"))
            for n in ns[1:]:
                assert_interval(row[f"drop from N = 1 to {n} [95% interval]"], list(drops(by_n, n).values()))
                assert_shows(row[f"log-prob gap per token, N = {n}"], values(by_n[n], "gap"))

    by_loss = {loss: {n: find(loss=loss, n=n) for n in ns} for loss in loss_names}
    robustness("Table 2", loss_names, lambda loss, n: by_loss[loss][n])
    by_size = {size: {n: find(size=size, n=n, lr=lr[size], sft=sft[size]) for n in ns} for size in mode["sizes"]}
    robustness("Table 3", {s: size_names[s] for s in mode["sizes"]}, lambda size, n: by_size[size][n])

    check_drift_table(table(tables, "Table 4. Neighbouring sizes at their closest drift"), every_run, mode, sft)
    check_verdicts(text, groups, mode, by_loss, by_size, find)


def check_drift_table(drift: dict, every_run: list, mode: dict, sft: dict):
    """Neighbouring sizes at their closest drift: of each size's online DPO runs at N = 1 and the largest N (at its warm
    start, any learning rate of the grid), the pair of rates whose mean log-prob gaps at the largest N are closest."""
    size_names = {"3m": "2.7 M", "10m": "10.6 M", "30m": "29.0 M"}
    sizes, largest = [s for s in size_names if s in mode["sizes"]], max(mode["n"])
    assert list(drift) == [f"{size_names[a]}, {size_names[b]}" for a, b in zip(sizes, sizes[1:])]

    def runs_of(size, lr, n):
        want = dict(model_size=size, loss_type="sigmoid", learning_rate=lr, sft_steps=sft[size], batches_per_round=n)
        want |= dict(num_steps=mode["steps"], updates_per_batch=1, num_samples=2, async_steps=0)
        return [r for r in every_run if all(r["args"][k] == v for k, v in want.items())]

    for small, large in zip(sizes, sizes[1:]):
        options = {
            (size, x): {n: runs_of(size, x, n) for n in (1, largest)} for size in (small, large) for x in mode["lrs"]
        }
        options = {key: by_n for key, by_n in options.items() if all(by_n.values())}
        gap = {key: statistics.fmean(values(by_n[largest], "gap")) for key, by_n in options.items()}
        pairs = [(a, b) for a in options if a[0] == small for b in options if b[0] == large]
        a, b = min(pairs, key=lambda p: abs(gap[p[0]] - gap[p[1]]))
        row = drift[f"{size_names[small]}, {size_names[large]}"]
        assert row["learning rates"] == f"{a[1]:g}, {b[1]:g}"
        for which, key in (("smaller", a), ("larger", b)):
            assert_shows(
                row[f"log-prob gap per token at N = {largest}, {which} size"], values(options[key][largest], "gap")
            )
            shown = row[f"drop from N = 1 to {largest}, {which} size [95% interval]"]
            assert_interval(shown, list(drops(options[key], largest).values()))
        diffs = drop_difference(options[a], options[b], largest)
        assert_interval(row["the smaller size's drop - the larger's [95% interval]"], diffs)


def check_verdicts(text, groups, mode, by_loss, by_size, find):
    """Each verdict, from its per-seed differences by the rule."""
    verdicts, largest = verdict_rows(text), max(mode["n"])
    check = partial(check_claim, verdicts)
    pairs = [("a", "rloo"), ("b", "best_of_k")]
    subs = [check(f"1{x}", drop_difference(by_loss[other], by_loss["sigmoid"], largest), ">") for x, other in pairs]
    assert verdicts["1"][0] == combine(subs)

    sizes = [s for s in ("3m", "10m", "30m") if s in mode["sizes"]]
    reasons, axis = [], []
    for small, large in zip(sizes, sizes[1:]):
        s1, l1 = by_seed(by_size[small][1]), by_seed(by_size[large][1])
        rises = [l1[s]["gold"] - s1[s]["gold"] for s in sorted(set(s1) & set(l1))]
        starts = (by_size[large][1][0]["sft"], by_size[small][1][0]["sft"])
        rises_by_sign = len(rises) == 1 and rises[0] > 0  # one seed: the rule gives no interval, its sign stands
        reasons += [small] * (starts[0] < starts[1] or (rule(rises, ">")[0] != "holds" and not rises_by_sign))
        axis.append((starts, rises))
    if reasons:
        assert verdicts["2"][0] == "not tested here" and "2a" not in verdicts
    else:
        pairs = zip("abc", sizes, sizes[1:])
        subs = [check(f"2{x}", drop_difference(by_size[s], by_size[b], largest), ">") for x, s, b in pairs]
        assert verdicts["2"][0] == combine(subs)
        # beside it, what makes the sizes an axis: each larger size's start and its paired rise on-policy
        shown = re.findall(
            r"starts at (\d\.\d+) against (\d\.\d+) and ends higher on-policy by ([^;]+)", verdicts["2"][1]
        )
        assert len(shown) == len(axis), verdicts["2"][1]
        for (large_start, small_start, rise), (starts, rises) in zip(shown, axis, strict=True):
            assert_shows(large_start, [starts[0]])
            assert_shows(small_start, [starts[1]])
            assert_interval(rise, rises)

    base, e2, k4 = find(), find(e=2), find(k=4, num_steps=mode["steps"] // 2)
    check("3a", paired(e2, base, lambda r, b: r["curve"] - b["curve"]), ">")
    kl_gap = lambda r, b: kl_at(r, min(r["gold"], b["gold"])) - kl_at(b, min(r["gold"], b["gold"]))  # noqa: E731
    check("3b", paired(e2, base, kl_gap), ">")
    if "bound" not in mode:  # the tiny study has none (the quick and full ones do)
        assert verdicts["3c"][0] == "not tested here" and "no generation-bound setting" in verdicts["3c"][1]
    else:
        bound = {
            e: [
                r
                for runs in groups.values()
                for r in runs
                if r["args"]["eval_every"] == 1
                and r["args"]["async_steps"] == 1
                and r["args"]["updates_per_batch"] == e
            ]
            for e in (1, 2)
        }
        assert bound[1] and bound[2]
        if statistics.fmean(values(bound[1], "G")) > statistics.fmean(values(bound[1], "T")):
            check("3c", paired(bound[2], bound[1], lambda r, b: r["step"] - b["step"] - b["T"]), "<")
        else:
            assert verdicts["3c"][0] == "not tested here" and "is not: G" in verdicts["3c"][1]
    check("4a", paired(k4, base, lambda r, b: r["gold"] - b["gold"]), ">=")
    check("4b", paired(k4, base, lambda r, b: r["wall"] - b["wall"]), "<")
    check("4c", paired(k4, base, lambda r, b: r["kl"] - b["kl"]), ">")
    expected = {"1", "1a", "1b", "2", "3a", "3b", "3c", "4a", "4b", "4c"}
    assert set(verdicts) == expected | (set() if reasons else {f"2{x}" for x in "abc"[: len(sizes) - 1]})


def test_tiny_study_tables_and_verdicts_match_raw_metrics(results_dir):
    check_report(results_dir)
    text = open(os.path.join(results_dir, "results.md")).read()
    assert "study.py --tiny" in text and "GiB RAM" in text and "vllm 0.32" in text
    results = json.load(open(os.path.join(results_dir, "results.json")))
    assert [c["id"] for c in results["claims"]][:3] == ["1", "1a", "1b"]
    assert all(row for t in results["tables"] for row in t["rows"])
    logs = {os.path.basename(path) for path in glob.glob(os.path.join(results_dir, "logs", "*.log"))}
    runs, sizes = results["study"]["runs"], results["study"]["mode_config"]["sizes"]
    assert logs == {f"{r['name']}__{r['seed']}.log" for r in runs} | {f"warm_start_{size}_sft30.log" for size in sizes}
    for name in PLOTS:
        assert f"({name})" in text
        pixels = matplotlib.image.imread(os.path.join(results_dir, name))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600 and pixels[..., :3].std() > 0.05  # not blank


def shift(name: str, seed: int, what: str, version: int) -> float:
    """A made-up amount in [-0.02, 0.02], fixed by its arguments."""
    return 0.02 * ((zlib.crc32(f"{name}{seed}{what}{version}".encode()) % 201) / 100 - 1)


def with_more_seeds(results_dir: str, copy: str, seeds=(2, 3)) -> str:
    """The tiny study's runs again as seeds 2 and 3, their evaluations and times moved by amounts that differ by run
    and seed, so that the report has intervals to compute: a test of the report's arithmetic and rule alone (the
    runs themselves are seed 1's). The learning rates stay as chosen: only seed 1 is in the grid's seeds."""
    shutil.copytree(results_dir, copy)
    record_path = os.path.join(copy, "raw", "study.json")
    record = json.load(open(record_path))
    for seed in seeds:
        for run in list(record["runs"]):
            if run["seed"] != 1:
                continue
            folder = os.path.join(copy, run["folder"])
            new = folder.replace("__1__", f"__{seed}__")
            shutil.copytree(folder, new)
            args = json.load(open(os.path.join(new, "args.json"))) | {"seed": seed}
            json.dump(args, open(os.path.join(new, "args.json"), "w"))
            rows = [json.loads(line) for line in open(os.path.join(new, "metrics.jsonl"))]
            for r in rows:
                if "eval/version" in r and r["eval/version"] > 0:
                    r["eval/gold_reward"] += shift(run["name"], seed, "gold", r["eval/version"])
                    r["eval/kl"] += 5 * shift(run["name"], seed, "kl", r["eval/version"])
            with open(os.path.join(new, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            summary = json.load(open(os.path.join(new, "summary.json")))
            summary["wall_time"] *= 1 + 5 * shift(run["name"], seed, "wall", 0)
            json.dump(summary, open(os.path.join(new, "summary.json"), "w"))
            record["runs"].append(run | {"seed": seed, "folder": os.path.relpath(new, copy)})
    record["mode_config"]["seeds"] = [1, *seeds]
    json.dump(record, open(record_path, "w"))
    return copy


def test_the_rule_on_several_seeds_is_what_the_study_page_states(results_dir, tmp_path):
    copy = with_more_seeds(results_dir, str(tmp_path / "seeds"))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(copy)
    verdicts = verdict_rows(open(os.path.join(copy, "results.md")).read())
    assert all("one seed" not in cell for _, shown, cell in verdicts.values()), verdicts


def test_a_resumed_study_names_each_machine_and_compares_wall_times_on_one(results_dir, tmp_path):
    """A study resumed on another machine: the record keeps each run's machine, the report names them all, and a
    wall-time comparison whose pair of runs ran on two machines is not tested here, while the comparisons in gold
    still stand."""
    copy = with_more_seeds(results_dir, str(tmp_path / "seeds"))
    record_path = os.path.join(copy, "raw", "study.json")
    record = json.load(open(record_path))
    assert all(run["machine"]["cpu"] == record["machine"]["cpu"] for run in record["runs"])
    k4 = S.setting(record["mode_config"]["steps"] // 2, k=4)["name"]
    for run in record["runs"]:
        if run["name"] == k4 and run["seed"] == 3:
            run["machine"] = run["machine"] | {"cpu": "Another CPU"}
    json.dump(record, open(record_path, "w"))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    text = open(os.path.join(copy, "results.md")).read()
    assert "2 machines" in text and f"1 run on {record['machine']['cores']} cores (Another CPU)" in text
    verdicts = verdict_rows(text)
    assert verdicts["4b"][0] == "not tested here" and "seed 3: the pair's two runs ran on different machines" in text
    assert verdicts["4a"][0] != "not tested here" and verdicts["4c"][0] != "not tested here"


def test_the_t_table_is_students_t():
    for dof, value in enumerate(S.T_975, 1):
        assert abs(value - t_quantile(dof)) < 2e-3, (dof, value)
    assert abs(S.t_975(40) - t_quantile(40)) < 5e-3 and abs(S.t_975(100) - 1.984) < 5e-3


def fake_runs(golds: dict) -> dict:
    """groups as the study loads them, for the stage rules alone: {name: [a run per seed]} with a version-0 gold (a
    probe's SFT gold) or a final gold; the rules read nothing else."""
    groups = {}
    for (name, seed), gold in golds.items():
        evals = [{"eval/version": 0, "eval/gold_reward": gold}, {"eval/version": 64, "eval/gold_reward": gold}]
        run = {"seed": seed, "evals": evals, "args": {"num_steps": 64, "eval_every": 16}}
        groups.setdefault(name, []).append(run)
    return groups


def test_the_stages_decide_warm_starts_then_learning_rates_then_the_rest():
    """The full study's plan, stage by stage, from the finished runs alone: the middle size's and the larger size's
    first SFT probe; the next probe while the larger size starts below the middle one; the learning-rate grid of every
    size at N = 1 once every warm start is chosen; and N > 1, the losses and the compute optimizations only once every
    learning rate is."""
    mode = S.MODES["full"]
    names = lambda runs: [(r["name"], r["seed"]) for r in runs]  # noqa: E731
    assert names(S.plan(mode, {})) == [("probe_10m_sft30", 1), ("probe_30m_sft30", 1)]
    golds = {("probe_10m_sft30", 1): 0.52, ("probe_30m_sft30", 1): 0.47}
    assert names(S.plan(mode, fake_runs(golds)))[-1] == ("probe_30m_sft60", 1)
    golds[("probe_30m_sft60", 1)] = 0.55
    planned = S.plan(mode, fake_runs(golds))
    assert S.choose_sft(mode, fake_runs(golds)) == {"3m": 30, "10m": 30, "30m": 60}
    grid = [r for r in planned if not r["name"].startswith("probe_")]
    assert len(grid) == 3 * 3 * 2 and {r["n"] for r in grid} == {1} and {r["seed"] for r in grid} == {1, 2}
    assert {(r["size"], r["sft"]) for r in grid} == {("3m", 30), ("10m", 30), ("30m", 60)}
    best = {"3m": 2e-4, "10m": 1e-4, "30m": 5e-5}
    golds |= {(r["name"], r["seed"]): 0.7 if r["lr"] == best[r["size"]] else 0.6 for r in grid}
    assert S.choose_lr(mode, fake_runs(golds), S.choose_sft(mode, fake_runs(golds))) == best
    rest = [r for r in S.plan(mode, fake_runs(golds)) if (r["name"], r["seed"]) not in golds]
    assert {r["seed"] for r in rest} == {1, 2, 3, 4, 5} and max(r.get("n", 1) for r in rest) == 4
    sizes = {(r["size"], r["lr"], r["sft"]) for r in rest if r["script"] == "sync" and r["loss"] == "sigmoid"}
    assert sizes >= {("3m", 2e-4, 30), ("10m", 1e-4, 30), ("30m", 5e-5, 60)}
    assert {r["script"] for r in rest} == {"sync", "async", "default"}
    # A larger size that starts below the next smaller one under every warm start of the grid is left out.
    golds = {("probe_10m_sft30", 1): 0.52} | {(f"probe_30m_sft{x}", 1): 0.4 for x in mode["sft_steps"]}
    assert S.choose_sft(mode, fake_runs(golds))["30m"] is None
    assert {r["size"] for r in S.plan(mode, fake_runs(golds)) if not r["name"].startswith("probe_")} == {"3m", "10m"}


def test_study_report_is_rebuilt_from_raw_alone(results_dir, tmp_path):
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    original = open(os.path.join(copy, "results.md")).read()
    for name in ["results.md", "results.json", *PLOTS]:
        os.remove(os.path.join(copy, name))
    result = study("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(os.path.join(copy, "results.md")).read() == original
    result = study("--tiny", "--results_dir", copy, timeout=60)
    assert result.returncode != 0 and "already holds runs" in result.stderr


def test_rloo_off_policy_has_a_ratio_away_from_1_and_on_policy_does_not(results_dir):
    """RLOO's π_old is vLLM's log-prob of each sampled token: with the paper's N = 2, a batch trained at lag 0 has
    π_θ = π_old, so ρ = 1 up to float error and nothing is clipped; at lag 1 the policy has moved, and ρ with it."""
    (args_file,) = [
        f
        for f in glob.glob(os.path.join(results_dir, "raw", "*", "args.json"))
        if json.load(open(f))["loss_type"] == "rloo" and json.load(open(f))["batches_per_round"] == 2
    ]
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(args_file), "metrics.jsonl"))]
    steps = [r for r in rows if "step" in r]
    evals = [r for r in rows if "eval/version" in r]
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


def test_an_interrupted_study_resumes_with_only_its_missing_run(results_dir, cache_dir, tmp_path):
    """A full study takes over an hour: --resume keeps the runs study.json lists, deletes what an interrupted run
    left, and runs only the missing ones."""
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
    """`python benchmark/study.py --tiny` as docs/study.md prints it, in the repository, where benchmark/study_results
    holds the committed study: it writes a new folder runs/study_tiny_{date-time} and says where (here it stops in its
    first run, on broken cached models; what it wrote is deleted). `--resume` goes on with the newest study of its
    mode under runs/ and says which; where there is none, it says how to name one."""
    cache = broken_cache(tmp_path, "3m", "10m")
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

    for name in ["study_tiny_20000101-000000", "study_tiny_20010101-000000", "study_quick_20990101-000000"]:
        (tmp_path / "here" / "runs" / name).mkdir(parents=True)
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
    """--resume on a study with no run left to do (as the committed one) says so: it builds no warm start and runs
    nothing, so raw/ and logs/ stay as they were, and it rebuilds results.md as it was."""
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
    """The full study docs/study.md quotes, recomputed from its raw/ by the reader's script above: the stages' probes
    and learning rates, every table a verdict reads and every verdict."""
    check_report(os.path.join(ROOT, "benchmark", "study_results"))


def test_the_committed_study_report_is_rebuilt_as_committed(tmp_path):
    """benchmark/study_results, the full study docs/study.md quotes: --report_only gives its results.md back from
    raw/."""
    check_committed_report_rebuilds("study.py", "study_results", tmp_path)
