"""The benchmark's plots, drawn from the runs' metrics (run.py's load_runs): reward curves, reward and KL
against staleness, and a timeline of when the generator and the trainer did what."""

import statistics

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

matplotlib.use("Agg")  # files only, no window: works without a display


def mean_curve(runs, x_key: str):
    """Mean over seeds of the gold reward at each evaluated version, at the mean x; and its std (arrays)."""
    versions = sorted(set.intersection(*({e["eval/version"] for e in r["evals"]} for r in runs)))
    at = [{e["eval/version"]: e for e in r["evals"]} for r in runs]
    xs = [statistics.fmean(a[v][x_key] for a in at) for v in versions]
    ys = [[a[v]["eval/gold_reward"] for a in at] for v in versions]
    stds = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
    return xs, np.array([statistics.fmean(y) for y in ys]), np.array(stds)


def reward_curves(path: str, groups: dict, title: str):
    """Held-out gold reward against wall-clock seconds (left) and against updates (right).
    groups: {label: (runs, colour, line style)}; a band is drawn where there are several seeds. Runs that
    learn the same (sync on split or shared cores) overlap against updates: a dashed line keeps both visible."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, (runs, color, style) in groups.items():
        seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
        for ax, x_key in zip(axes, ("eval/wall_time", "eval/version"), strict=True):
            xs, means, stds = mean_curve(runs, x_key)
            ax.plot(xs, means, style, marker="o", markersize=3, color=color, label=f"{label} ({seeds})")
            if len(runs) > 1:
                ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.2)
    axes[0].set_xlabel("wall-clock seconds since the run started")
    axes[1].set_xlabel("updates (policy version)")
    axes[0].set_ylabel("held-out gold reward")
    axes[1].legend(fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
    several = any(len(runs) > 1 for runs, _, _ in groups.values())
    fig.suptitle(title + (" (mean ± std over seeds)" if several else ""))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def staleness(path: str, by_n: dict, gap):
    """Final gold reward, final KL and the log-prob gap against A = --async_steps; A = 0 is the sync run. Dots are
    seeds, the line their mean. gap(run) is the run's mean per-token log-prob gap between trainer and sampler."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    positions = list(range(len(by_n)))  # evenly spaced: N = 1, 2, 4, 8, 16 would crowd a linear axis
    labels = ["0\n(sync)" if n == 0 else str(n) for n in by_n]
    panels = [
        (lambda r: r["summary"]["eval_gold_reward_end"], "final held-out gold reward"),
        (lambda r: r["summary"]["kl_end"], "final KL"),
        (gap, "log-prob gap, trainer vs sampler (per token)"),
    ]
    for ax, (value, ylabel) in zip(axes, panels, strict=True):
        values = [[value(r) for r in runs] for runs in by_n.values()]
        for pos, v in zip(positions, values, strict=True):
            ax.scatter([pos] * len(v), v, color="0.55", s=14, zorder=3, label="one seed" if pos == 0 else None)
        ax.plot(positions, [statistics.fmean(v) for v in values], marker="o", color="tab:blue", label="mean over seeds")
        ax.axhline(statistics.fmean(values[0]), color="tab:gray", linestyle="--", linewidth=1, label="sync (mean)")
        ax.set_xticks(positions, labels)
        ax.set_xlabel("A = --async_steps (updates every batch lags)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Staleness: how far the generator may run ahead")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


SPANS = {  # span name in metrics.jsonl's timeline -> colour, legend entry
    "generate": ("tab:blue", "generator: sample a batch"),
    "load": ("tab:orange", "generator: load new weights"),
    "eval": ("tab:purple", "generator: evaluate held-out prompts"),
    "train": ("tab:green", "trainer: one DPO update"),
    "push": ("tab:red", "trainer: push weights"),
    "wait": ("0.85", "waiting"),
}


def timeline(path: str, panels: list, num_steps: int = 6):
    """A Gantt chart of the first steps of each run in panels [(title, run)]: one lane for the generator,
    one for the trainer, on a shared x axis that starts when the run's generator was ready."""
    windows = []
    for _, run in panels:
        rows = run["steps"][:num_steps]
        origin = rows[0]["timeline"]["generator"][0][1]  # the trainer waited for vLLM to start before this
        windows.append((rows, origin, rows[-1]["timeline"]["trainer"][-1][2] - origin))
    x_max = max(w[2] for w in windows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(15, 1.9 * len(panels) + 1), sharex=True, squeeze=False)
    labels = []  # (text, bar, lane): a label goes inside its bar, or above it where it does not fit
    for ax, (title, run), (rows, origin, end) in zip(axes[:, 0], panels, windows, strict=True):
        for lane, process in ((1, "generator"), (0, "trainer")):
            for i, row in enumerate(rows):
                for name, start, stop, version in row["timeline"][process]:
                    start, stop = max(start, origin) - origin, min(stop - origin, x_max)
                    if stop <= start:
                        continue
                    width = max(stop - start, x_max * 0.002)  # keep a quick weight push visible
                    (bar,) = ax.barh(
                        lane, width, left=start, height=0.62, color=SPANS[name][0], edgecolor="white", linewidth=0.6
                    )
                    label = {"generate": f"b{i} (v{version})", "train": f"b{i} → v{i + 1}"}.get(name)
                    if label:
                        text = ax.text(
                            start + width / 2, lane, label, ha="center", va="center", fontsize=8, color="white"
                        )
                        labels.append((text, bar, lane))
        ax.set_yticks([0, 1], ["trainer", "generator"])
        ax.set_ylim(-0.5, 1.75)
        per_step = run["summary"]["time_per_step"]
        ax.set_title(
            f"{title}: {len(rows)} updates in {end:.1f} s ({per_step:.2f} s/step over the whole run)",
            loc="left",
            fontsize=10,
        )
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlim(0, x_max)
    axes[-1, 0].set_xlabel("seconds since the generator was ready")
    handles = [Patch(color=color, label=label) for color, label in SPANS.values()]
    fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02)
    )
    fig.suptitle(
        "Timeline of the first updates: b3 (v2) = batch 3 sampled by policy version 2; b3 → v4 = trained into version 4"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    renderer = fig.canvas.get_renderer()
    for text, bar, lane in labels:
        if text.get_window_extent(renderer).width > bar.get_window_extent(renderer).width - 4:
            text.set(y=lane + 0.33, va="bottom", color="black", fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def frontier(path: str, panels: list, title: str, gold, kl):
    """The paper's presentation of its off-policy study: final gold reward against final KL, one marker per N, one
    panel per loss or per policy size. panels: [(panel title, {N: runs}, SFT gold reward)]; gold(run) and kl(run) are
    a run's final values. A marker is the mean over seeds with its std as error bars, the small dots the seeds, the
    star the SFT policy (KL 0)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharex=True, sharey=True, squeeze=False)
    every_n = sorted({n for _, by_n, _ in panels for n in by_n})
    colors = dict(zip(every_n, plt.cm.viridis(np.linspace(0, 0.9, len(every_n))), strict=True))
    for ax, (panel_title, by_n, start) in zip(axes[0], panels, strict=True):
        ax.scatter([0], [start], marker="*", s=160, color="tab:red", zorder=4, label="SFT policy")
        for n, runs in by_n.items():
            kls, golds = [kl(r) for r in runs], [gold(r) for r in runs]
            ax.scatter(kls, golds, s=12, color=colors[n], alpha=0.5, zorder=2)
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (kls, golds)]
            ax.errorbar(
                statistics.fmean(kls),
                statistics.fmean(golds),
                xerr=spread[0],
                yerr=spread[1],
                fmt="o",
                markersize=8,
                color=colors[n],
                capsize=3,
                zorder=3,
                label=f"N = {n}",
            )
        ax.set_title(panel_title)
        ax.set_xlabel("final KL to the SFT policy")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("final held-out gold reward")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def drift(path: str, series: dict, gold, gap):
    """Robustness against how off-policy the batches were: per seed, the drop in final gold reward from N = 1 to each
    larger N, against that run's mean per-token log-prob gap between trainer and sampler. series: {label: {N: runs}};
    equal N need not mean equal drift, and this plot tells the two apart."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.tab10(np.arange(len(series)))
    for color, (label, by_n) in zip(colors, series.items(), strict=True):
        on_policy = {r["seed"]: gold(r) for r in by_n[1]}
        xs, ys = [], []
        for n, runs in by_n.items():
            if n == 1:
                continue
            pairs = [(gap(r), on_policy[r["seed"]] - gold(r)) for r in runs if r["seed"] in on_policy]
            ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], s=14, color=color, alpha=0.5)
            xs.append(statistics.fmean(p[0] for p in pairs))
            ys.append(statistics.fmean(p[1] for p in pairs))
            if len(by_n) > 2:  # several off-policy N: name each point (with one, the title does)
                ax.annotate(f"N = {n}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.plot(xs, ys, marker="o", color=color, label=label)
    ax.axhline(0, color="tab:gray", linewidth=1)
    ax.set_xlabel("log-prob gap, trainer vs sampler (per token, mean over the run)")
    ax.set_ylabel("drop in final gold reward from N = 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ns = sorted({n for by_n in series.values() for n in by_n if n != 1})
    at = f"N = {ns[0]}" if len(ns) == 1 else "each N"
    ax.set_title(f"The cost of off-policy data at {at} against the measured drift (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def tradeoff(path: str, groups: dict, title: str):
    """A compute optimization against its baseline: gold reward against updates and against wall time, and gold
    reward against KL along the evaluations (the frontier the paper draws for it). groups: {label: (runs, colour)};
    bands are the seeds' std."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for label, (runs, color) in groups.items():
        for ax, x_key in zip(axes, ("eval/version", "eval/wall_time", "eval/kl"), strict=True):
            xs, means, stds = mean_curve(runs, x_key)
            ax.plot(xs, means, marker="o", markersize=3, color=color, label=label)
            if len(runs) > 1:
                ax.fill_between(xs, means - stds, means + stds, color=color, alpha=0.2)
    axes[0].set_xlabel("policy version (batches of prompts trained on)")
    axes[1].set_xlabel("wall-clock seconds since the run started")
    axes[2].set_xlabel("KL to the SFT policy (mean over seeds at each evaluation)")
    for ax in axes:
        ax.set_ylabel("held-out gold reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
