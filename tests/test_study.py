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


def study(*flags, timeout=600):
    return run_script(STUDY_PY, None, None, *flags, timeout=timeout)


PLOTS = ["losses.png", "sizes.png", "updates_per_batch.png", "num_samples.png"]


@pytest.fixture(scope="module")
def results_dir(cache_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("study"))
    result = study("--tiny", "--results_dir", path, "--cache_dir", cache_dir, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path


def read_settings(results_dir: str) -> dict:
    """Every run under raw/, grouped by the flags its args.json records: (loss, size, N, E, k, steps) -> runs."""
    settings = {}
    for args_file in glob.glob(os.path.join(results_dir, "raw", "*", "args.json")):
        folder = os.path.dirname(args_file)
        args = json.load(open(args_file))
        assert args["async_steps"] == 0  # the paper's study is synchronous, with N batches per version
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        assert [r["async/lag"] for r in steps] == [i % args["batches_per_round"] for i in range(len(steps))]
        gaps = [g for r in steps if not math.isnan(g := r["async/logprob_gap"])]
        run = {
            "seed": args["seed"],
            "sft": evals[0]["eval/gold_reward"],
            "gold": evals[-1]["eval/gold_reward"],
            "kl": evals[-1]["eval/kl"],
            "curve": statistics.fmean(e["eval/gold_reward"] for e in evals[1:]),
            "lag": statistics.fmean(r["async/lag"] for r in steps),
            "gap": statistics.fmean(gaps),
            "wall": json.load(open(os.path.join(folder, "summary.json")))["wall_time"],
            "step": statistics.fmean(r["time/step"] for r in steps[1:]),
        }
        key = (args["loss_type"], args["model_size"], args["batches_per_round"], args["updates_per_batch"])
        settings.setdefault(key + (args["num_samples"], args["num_steps"]), []).append(run)
    return {key: sorted(runs, key=lambda r: r["seed"]) for key, runs in settings.items()}


def values(runs, key):
    return [r[key] for r in runs]


def per_seed(runs, reference, fn):
    by_seed = {r["seed"]: r for r in reference}
    return [fn(r, by_seed[r["seed"]]) for r in runs]


def kept(run, on_policy):
    gain = on_policy["gold"] - on_policy["sft"]
    return (run["gold"] - run["sft"]) / gain if gain > 0 else float("nan")


def shows_nan(text: str, vals: list[float]) -> bool:
    return text == "nan" and all(math.isnan(v) for v in vals)


def check_report(results_dir: str):
    text = open(os.path.join(results_dir, "results.md")).read()
    tables = parse_tables(text)
    settings = read_settings(results_dir)
    mode = json.load(open(os.path.join(results_dir, "raw", "study.json")))["mode_config"]
    steps, ns, largest = mode["steps"], mode["n"], max(mode["n"])

    every = table(tables, "Table 4")
    assert len(every) == len(settings) == 3 * len(ns) + (len(mode["sizes"]) - 1) * len(ns) + 2  # every setting, once
    for row in every.values():
        key = (row["loss"], row["size"], int(row["N"]), int(row["E"]), int(row["k"]))
        loss = {"online DPO": "sigmoid", "RLOO": "rloo", "best-of-2 SFT": "best_of_k"}[key[0]]
        size = {"2.7 M": "3m", "10.6 M": "10m", "29.0 M": "30m"}[key[1]]
        runs = settings[(loss, size, *key[2:], int(row["updates"]) // key[3])]
        for column, name in [
            ("SFT gold reward", "sft"),
            ("final gold reward", "gold"),
            ("final KL", "kl"),
            ("mean gold over the run", "curve"),
            ("mean lag (updates)", "lag"),
            ("log-prob gap (per token)", "gap"),
            ("wall time (s)", "wall"),
            ("s/step", "step"),
        ]:
            assert_shows(row[column], values(runs, name))

    def robustness_rows(title: str, label_of: dict, key_of):
        rows = table(tables, title)
        assert list(rows) == list(label_of.values())
        verdicts = {}
        for x, label in label_of.items():
            row, by_n = rows[label], {n: settings[key_of(x, n)] for n in ns}
            for n in ns:
                assert_shows(row[f"final gold, N = {n}"], values(by_n[n], "gold"))
                assert_shows(row[f"final KL, N = {n}"], values(by_n[n], "kl"))
            drops = per_seed(by_n[largest], by_n[1], lambda r, b: b["gold"] - r["gold"])
            assert_shows(row[f"gold fall from N = 1 to {largest}"], drops)
            share = per_seed(by_n[largest], by_n[1], kept)
            cell = row[f"share of the N = 1 gain kept at N = {largest}"]
            if not shows_nan(cell, share):  # a loss or size that gained nothing on-policy has no share to keep
                assert_shows(cell, share)
            verdicts[x] = share
        return verdicts

    losses = {"sigmoid": "online DPO", "rloo": "RLOO", "best_of_k": "best-of-2 SFT"}
    by_loss = robustness_rows("Table 1", losses, lambda loss, n: (loss, "10m", n, 1, 2, steps))
    sizes = {s: {"3m": "2.7 M", "10m": "10.6 M", "30m": "29.0 M"}[s] for s in mode["sizes"]}
    by_size = robustness_rows("Table 2", sizes, lambda size, n: ("sigmoid", size, n, 1, 2, steps))

    compute = table(tables, "Table 3")
    base = settings[("sigmoid", "10m", 1, 1, 2, steps)]
    for label, key in [
        ("baseline: k = 2, E = 1", ("sigmoid", "10m", 1, 1, 2, steps)),
        ("E = 2 updates per batch", ("sigmoid", "10m", 1, 2, 2, steps)),
        ("k = 4, half the batches", ("sigmoid", "10m", 1, 1, 4, steps // 2)),
    ]:
        row, runs = compute[label], settings[key]
        assert int(row["updates"]) == key[5] * key[3]
        assert int(row["completions sampled"]) == key[5] * mode["batch_size"] * key[4]
        for column, name in [("final gold reward", "gold"), ("final KL", "kl"), ("mean gold over the run", "curve")]:
            assert_shows(row[column], values(runs, name))
        ratio = per_seed(runs, base, lambda r, b: r["wall"] / b["wall"])
        assert_shows(row["wall time against the baseline (×)"], ratio)

    # The verdicts, from the numbers above: a difference counts beyond the larger std over seeds of the two.
    def std(v):
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def more(a, b):
        return statistics.fmean(a) - statistics.fmean(b) > max(std(a), std(b))

    def robust(a, b):
        return not any(math.isnan(x) for x in a + b) and more(a, b)

    claim_1 = robust(by_loss["sigmoid"], by_loss["rloo"]) and robust(by_loss["sigmoid"], by_loss["best_of_k"])
    claim_2 = all(robust(by_size[big], by_size[small]) for small, big in zip(mode["sizes"], mode["sizes"][1:]))
    e2, k4 = settings[("sigmoid", "10m", 1, 2, 2, steps)], settings[("sigmoid", "10m", 1, 1, 4, steps // 2)]
    claim_3 = (
        more(values(e2, "curve"), values(base, "curve"))
        and more(values(e2, "kl"), values(base, "kl"))
        and not more(values(base, "gold"), values(k4, "gold"))
        and statistics.fmean(values(k4, "wall")) < statistics.fmean(values(base, "wall"))
        and more(values(k4, "kl"), values(base, "kl"))
    )
    lines = [line for line in text.splitlines() if line[:3] in ("1. ", "2. ", "3. ")]
    for line, holds in zip(lines, (claim_1, claim_2, claim_3), strict=True):
        assert line.endswith(": holds here.") == holds and ("does not hold at this scale" in line) != holds, line


def test_tiny_study_tables_and_verdicts_match_raw_metrics(results_dir):
    check_report(results_dir)
    text = open(os.path.join(results_dir, "results.md")).read()
    assert "study.py --tiny" in text and "GiB RAM" in text and "vllm 0.32" in text
    results = json.load(open(os.path.join(results_dir, "results.json")))
    assert len(results["claims"]) == 3 and all(row for t in results["tables"] for row in t["rows"])
    logs = {os.path.basename(path) for path in glob.glob(os.path.join(results_dir, "logs", "*.log"))}
    runs, sizes = results["study"]["runs"], results["study"]["mode_config"]["sizes"]
    assert logs == {f"{r['name']}__{r['seed']}.log" for r in runs} | {f"warm_start_{size}.log" for size in sizes}
    for name in PLOTS:
        assert f"({name})" in text
        pixels = matplotlib.image.imread(os.path.join(results_dir, name))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 800 and pixels[..., :3].std() > 0.05  # not blank


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


def test_the_readme_study_commands_run_as_printed(tmp_path):
    """`python benchmark/study.py --tiny` as the README prints it, in the repository, where benchmark/study_results
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


def test_the_committed_study_report_is_rebuilt_as_committed(tmp_path):
    """benchmark/study_results, the full study the README quotes: --report_only gives its results.md back from raw/."""
    check_committed_report_rebuilds("study.py", "study_results", tmp_path)
