"""The benchmark end to end in its tiny configuration (about 2 minutes): every number in results.md must
be the one the raw run folders give, recomputed here from metrics.jsonl and summary.json without the
benchmark's code, and every plot must be drawn."""

import glob
import json
import math
import os
import re
import shutil
import statistics
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

RUN_PY = os.path.join(ROOT, "benchmark", "run.py")
PLOTS = ["speed_reward.png", "timeline.png", "staleness.png", "num_samples.png"]


def benchmark(*flags, timeout=600):
    return run_script(RUN_PY, None, None, *flags, timeout=timeout)


@pytest.fixture(scope="module")
def results_dir(cache_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("benchmark"))
    result = benchmark("--tiny", "--results_dir", path, "--cache_dir", cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return path


# ----------------------------------------------------------------------------------------------------
# Reading the raw runs back, independently of benchmark/run.py.
def per_step(steps: list[dict], *keys: str) -> float:
    """Mean over steps of the seconds spent in these time/ keys together."""
    return statistics.fmean(sum(r[f"time/{k}"] for k in keys) for r in steps)


def read_runs(results_dir: str) -> dict:
    """Every run folder under raw/, grouped by what its args.json says it is."""
    groups = {}
    for args_file in glob.glob(os.path.join(results_dir, "raw", "*", "args.json")):
        folder = os.path.dirname(args_file)
        args = json.load(open(args_file))
        rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        steps = [r for r in rows if "step" in r]
        evals = sorted((r for r in rows if "eval/version" in r), key=lambda r: r["eval/version"])
        steady = steps[1:]  # step 0 waits for vLLM to start
        run = {
            "seed": args["seed"],
            "wall": json.load(open(os.path.join(folder, "summary.json")))["wall_time"],
            "step": per_step(steady, "step"),
            "G": per_step(steady, "generate", "load_weights", "eval"),
            "T": per_step(steady, "train", "push_weights"),
            "load": per_step(steady, "load_weights"),
            "push": per_step(steady, "push_weights"),
            "trainer_wait": per_step(steady, "wait_samples"),
            "generator_wait": per_step(steady, "wait_weights"),
            "reward": evals[-1]["eval/gold_reward"],
            "kl": evals[-1]["eval/kl"],
            "lag": statistics.fmean(r["async/lag"] for r in steady),
            "gap": statistics.fmean(g for r in steady if not math.isnan(g := r["async/logprob_gap"])),
        }
        if args["async_steps"] == 0:
            key = "sync_shared" if args["cpu_share_cores"] else "sync"
        else:
            key = f"async_A{args['async_steps']}" + ("_k4" if args["num_samples"] == 4 else "")
        groups.setdefault(key, []).append(run)
    return groups


def column(runs, key):
    return [r[key] for r in sorted(runs, key=lambda r: r["seed"])]


def paired(runs, reference, fn):
    """fn(run, reference run of the same seed), per seed."""
    by_seed = {r["seed"]: r for r in reference}
    return [fn(r, by_seed[r["seed"]]) for r in sorted(runs, key=lambda r: r["seed"])]


def expected_verdict(runs, reference):
    """Faster in wall time, and no lower final reward beyond the seed noise, on the seeds both have."""
    reference = [r for r in reference if r["seed"] in {x["seed"] for x in runs}]
    noise = max([statistics.stdev(column(g, "reward")) for g in (runs, reference) if len(g) > 1], default=0)
    faster = statistics.fmean(column(runs, "wall")) < statistics.fmean(column(reference, "wall"))
    as_good = statistics.fmean(column(runs, "reward")) >= statistics.fmean(column(reference, "reward")) - noise
    return faster and as_good


def check_report(results_dir: str):
    tables = parse_tables(open(os.path.join(results_dir, "results.md")).read())
    runs = read_runs(results_dir)
    sync, shared, async_ = runs["sync"], runs["sync_shared"], runs["async_A1"]

    where = table(tables, "Table 1a")
    for label, group in [
        ("sync, split cores (A = 0)", sync),
        ("sync, shared cores (A = 0, --cpu_share_cores)", shared),
        ("async, split cores (A = 1)", async_),
    ]:
        row = where[label]
        for col, key in [
            ("wall time (s)", "wall"),
            ("s/step", "step"),
            ("G: generator busy (s/step)", "G"),
            ("T: trainer busy (s/step)", "T"),
            ("loading weights (s/step)", "load"),
            ("pushing weights (s/step)", "push"),
            ("trainer waits (s/step)", "trainer_wait"),
            ("generator waits (s/step)", "generator_wait"),
        ]:
            assert_shows(row[col], column(group, key))

    speed = table(tables, "Table 1b")
    row = speed["async, split cores (A = 1)"]
    assert_shows(row["speedup over sync, per step (×)"], paired(async_, sync, lambda a, s: s["step"] / a["step"]))
    assert_shows(row["speedup over sync, wall time (×)"], paired(async_, sync, lambda a, s: s["wall"] / a["wall"]))
    assert_shows(
        row["ideal (G+T)/max(G,T) from sync (×)"],
        paired(async_, sync, lambda a, s: (s["G"] + s["T"]) / max(s["G"], s["T"])),
    )
    assert_shows(row["final gold reward"], column(async_, "reward"))
    assert_shows(row["final KL"], column(async_, "kl"))
    assert row["beats sync, split cores?"].startswith("yes" if expected_verdict(async_, sync) else "**NO**")
    assert row["beats sync, shared cores?"].startswith("yes" if expected_verdict(async_, shared) else "**NO**")
    assert_shows(
        speed["sync, shared cores (A = 0, --cpu_share_cores)"]["speedup over sync, wall time (×)"],
        paired(shared, sync, lambda a, s: s["wall"] / a["wall"]),
    )

    staleness = table(tables, "Table 2")
    n_values = sorted(
        int(key.removeprefix("async_A")) for key in runs if key.startswith("async_A") and not key.endswith("_k4")
    )
    assert list(staleness) == ["0 (sync)", *map(str, n_values)]
    for n in n_values:
        row, group = staleness[str(n)], runs[f"async_A{n}"]
        for col, key in [
            ("final gold reward", "reward"),
            ("final KL", "kl"),
            ("mean lag (updates)", "lag"),
            ("log-prob gap (per token)", "gap"),
            ("s/step", "step"),
            ("wall time (s)", "wall"),
        ]:
            assert_shows(row[col], column(group, key))
        assert row["beats sync?"].startswith("yes" if expected_verdict(group, sync) else "**NO**")
    assert_shows(staleness["0 (sync)"]["final gold reward"], column(sync, "reward"))
    assert_shows(staleness["0 (sync)"]["log-prob gap (per token)"], column(sync, "gap"))

    num_samples = table(tables, "Table 3")
    four = runs["async_A1_k4"]
    two = [r for r in async_ if r["seed"] in {x["seed"] for x in four}]
    for k, group in (("2", two), ("4", four)):
        for col, key in [
            ("G: generator busy (s/step)", "G"),
            ("T: trainer busy (s/step)", "T"),
            ("final gold reward", "reward"),
            ("wall time (s)", "wall"),
        ]:
            assert_shows(num_samples[k][col], column(group, key))
    assert_shows(num_samples["4"]["wall time against k = 2 (×)"], paired(four, two, lambda a, b: a["wall"] / b["wall"]))

    throughput = table(tables, "Table 4")
    measured = {
        e: json.load(open(os.path.join(results_dir, "raw", f"throughput_{e}.json"))) for e in ("vllm", "transformers")
    }
    for label, engine in (("vLLM", "vllm"), ("transformers generate", "transformers")):
        assert_shows(throughput[label]["tokens/s"], [measured[engine]["tokens"] / measured[engine]["seconds"]])
        assert_shows(throughput[label]["completion tokens"], [measured[engine]["tokens"]])
    return tables


# ----------------------------------------------------------------------------------------------------
def test_tiny_benchmark_table_matches_raw_metrics(results_dir):
    check_report(results_dir)
    text = open(os.path.join(results_dir, "results.md")).read()
    assert "benchmark/run.py --tiny" in text and "GiB RAM" in text and "vllm 0.32" in text
    assert "split-core" in text and "separate GPUs" in text  # says which comparison is the paper's
    results = json.load(open(os.path.join(results_dir, "results.json")))
    assert all(row for t in results["tables"] for row in t["rows"])
    assert len(glob.glob(os.path.join(results_dir, "logs", "*.log"))) == len(results["benchmark"]["runs"]) + 2
    for name in PLOTS:
        assert f"({name})" in text
        path = os.path.join(results_dir, name)
        assert os.path.getsize(path) > 20_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 800 and pixels[..., :3].std() > 0.05  # not blank


def test_report_is_rebuilt_from_raw_alone(results_dir, tmp_path):
    """--report_only gives the same results.md from raw/; and when raw/ holds other numbers, the table
    shows those, with the spread over seeds where there are several."""
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    original = open(os.path.join(copy, "results.md")).read()
    for name in ["results.md", "results.json", *PLOTS]:
        os.remove(os.path.join(copy, name))
    result = benchmark("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    assert open(os.path.join(copy, "results.md")).read() == original

    # A second seed for sync and async, made from the first with other times and rewards.
    record_file = os.path.join(copy, "raw", "benchmark.json")
    record = json.load(open(record_file))
    for run in [r for r in record["runs"] if r["name"] in ("sync", "async_A1")]:
        folder = os.path.join(copy, run["folder"])
        new_folder = folder.replace("__1__", "__2__")
        shutil.copytree(folder, new_folder)
        args = json.load(open(os.path.join(new_folder, "args.json")))
        json.dump(args | {"seed": 2}, open(os.path.join(new_folder, "args.json"), "w"))
        # Slower by 1.3 and 0.8 times the reward, in summary.json and metrics.jsonl alike.
        summary = json.load(open(os.path.join(new_folder, "summary.json")))
        for key in summary:
            if key.endswith("_per_step") or key in ("wall_time", "time_per_step"):
                summary[key] *= 1.3
            elif key.startswith("eval_gold_reward"):
                summary[key] *= 0.8
        json.dump(summary, open(os.path.join(new_folder, "summary.json"), "w"))
        rows = [json.loads(line) for line in open(os.path.join(new_folder, "metrics.jsonl"))]
        for row in rows:
            for key in row:
                if key.startswith("time/"):
                    row[key] *= 1.3
            if "eval/gold_reward" in row:
                row["eval/gold_reward"] *= 0.8
        with open(os.path.join(new_folder, "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        record["runs"].append(run | {"seed": 2, "folder": os.path.relpath(new_folder, copy)})
    json.dump(record, open(record_file, "w"))
    result = benchmark("--report_only", "--results_dir", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = check_report(copy)
    assert table(tables, "Table 1a")["sync, split cores (A = 0)"]["seeds"] == "1, 2"
    assert " ± " in table(tables, "Table 1a")["sync, split cores (A = 0)"]["wall time (s)"]


def test_a_failed_run_stops_the_benchmark_loudly(tmp_path):
    cache = broken_cache(tmp_path, "10m")
    result = benchmark("--tiny", "--results_dir", str(tmp_path / "results"), "--cache_dir", cache, timeout=300)
    assert result.returncode != 0
    assert "error: exit code" in result.stderr and "throughput.py" in result.stderr
    assert "Traceback" in result.stderr  # the tail of the failed run's log

    (tmp_path / "old" / "raw" / "sync__1__0").mkdir(parents=True)
    result = benchmark("--tiny", "--results_dir", str(tmp_path / "old"), timeout=60)
    assert result.returncode != 0 and "already holds runs" in result.stderr


def test_the_benchmark_commands_run_as_printed_in_the_repository(tmp_path):
    """`python benchmark/run.py --tiny` as docs/benchmark.md prints it, run twice in the repository, where
    benchmark/results holds the committed benchmark: each time it writes a new folder runs/benchmark_tiny_{date-time}
    and says where. Here each stops in its first step, throughput.py, on a broken cached model; what they wrote is
    deleted."""
    cache = broken_cache(tmp_path, "10m")
    runs_existed = os.path.isdir(RUNS)
    made = []
    try:
        for _ in range(2):  # the same command twice
            result = benchmark("--tiny", "--cache_dir", cache, timeout=300)
            made += sorted(set(re.findall(r"runs/benchmark_tiny_\d{8}-\d{6}", result.stdout)))
            assert "already holds runs" not in result.stderr, result.stderr[-3000:]
            assert result.returncode != 0 and "error: exit code" in result.stderr and "throughput.py" in result.stderr
        assert len(set(made)) == 2, made
        assert all(os.path.exists(os.path.join(ROOT, folder, "raw", "benchmark.json")) for folder in made)
    finally:
        clean_up_runs(set(made), runs_existed)


def test_ctrl_c_stops_the_benchmark_and_its_run_with_one_line(tmp_path):
    marker = uuid.uuid4().hex
    results = str(tmp_path / "results")
    p = start(
        RUN_PY, None, None, "--tiny", "--results_dir", results, "--cache_dir", str(tmp_path / "cache"), marker=marker
    )
    line = interrupt(p, "throughput: vllm", marker)  # throughput.py builds the warm start when Ctrl-C comes
    assert results in line


def staleness_verdict(results_dir: str) -> str:
    (line,) = [line for line in open(os.path.join(results_dir, "results.md")) if line.startswith("- Staleness: ")]
    return line.strip()


def test_the_staleness_verdict_reads_right_when_every_or_no_A_beats_sync(results_dir, tmp_path):
    """The report rebuilt from raw/ where sync's runs were made so slow (and bad) that async beats it at every A, or
    so fast that it beats it at none: the verdict says so in a sentence, not as a list that reads "none"."""
    copy = str(tmp_path / "results")
    shutil.copytree(results_dir, copy)
    record = json.load(open(os.path.join(copy, "raw", "benchmark.json")))
    tried = ", ".join(map(str, record["mode_config"]["staleness"]))
    for sync_summary, sentence in [
        ({"wall_time": 1e9, "eval_gold_reward_end": 0.0}, f"async beats sync at every A tried ({tried})."),
        ({"wall_time": 1e-3}, f"async does **NOT** beat sync at any A tried ({tried})."),
    ]:
        for run in [r for r in record["runs"] if r["name"] == "sync"]:
            path = os.path.join(copy, run["folder"], "summary.json")
            json.dump(json.load(open(path)) | sync_summary, open(path, "w"))
        result = benchmark("--report_only", "--results_dir", copy)
        assert result.returncode == 0, result.stderr[-3000:]
        assert staleness_verdict(copy) == f"- Staleness: {sentence}"


def test_the_committed_report_is_rebuilt_as_committed(tmp_path):
    """benchmark/results, the full benchmark docs/benchmark.md quotes: --report_only gives its results.md back from
    raw/."""
    check_committed_report_rebuilds("run.py", "results", tmp_path)
