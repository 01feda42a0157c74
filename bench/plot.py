"""Plots from the benchmark's JSON (never recomputed): latency vs tokens per rank, one panel per
preset and routing, one line per backend, the physical floor dashed.

    python bench/plot.py bench/results/<run>/bench_w4.json [--out bench/results/<run>/latency.png]

(bench/layer.py draws it itself beside its JSON.)"""

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(data: dict, out: str) -> str:
    """data: the benchmark's JSON ({"meta", "rows"}) -> the figure saved at `out`; -> out."""
    meta, rows = data["meta"], [r for r in data["rows"] if r["median_us"]]
    per = "GPU" if meta["device"] != "cpu" else "rank"
    panels = sorted({(r["preset"], r["routing"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (preset, routing) in zip(axes[0], panels):
        lines, floor = defaultdict(list), {}
        for r in rows:
            if (r["preset"], r["routing"]) == (preset, routing):
                lines[r["backend"]].append((r["tokens_per_rank"], r["median_us"]))
                floor[r["tokens_per_rank"]] = r["floor_us"]
        for backend, pts in sorted(lines.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=backend)
        if all(floor.values()):
            ax.plot(*zip(*sorted(floor.items())), "k--", label="physical floor")
        ax.set(yscale="log", xlabel=f"tokens per {per}", ylabel="µs per forward (max over ranks)",
               title=f"{preset}, {routing} routing")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(floor), [str(t) for t in sorted(floor)])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['device']} x{meta['world']}  ({meta['date'][:10]}, commit {meta['commit']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("json")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    print(f"wrote {plot(data, args.out or os.path.join(os.path.dirname(args.json), 'latency.png'))}")


if __name__ == "__main__":
    main()
