"""Plots from the benchmark's JSON (never recomputed): latency vs tokens per rank, one panel per
preset and routing, forward rows in the top row of panels and training steps (mode 'fwd+bwd')
in a second row where the JSON has them; one line per backend, mode and backward (as
bench/layer.py's table labels rows), each row of panels with its own floor dashed. Rows that
failed their check are left out (listed under the figure's title).

    python bench/plot.py bench/results/<run>/bench_w4.json [--out bench/results/<run>/latency.png]

(bench/layer.py draws it itself beside its JSON.)"""

import argparse
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


MODES = (("forward", "µs per forward (max over ranks)"),
         ("fwd+bwd", "µs per forward + backward (max over ranks)"))


def kind(row: dict) -> str:
    """'fwd+bwd' for a training step's row, 'forward' otherwise (no mode, or a peer's own forward
    mode such as symm_mem's '1d+regroup')."""
    return "fwd+bwd" if row.get("mode") == "fwd+bwd" else "forward"


def label(row: dict) -> str:
    """A line's name: the backend, /backward for a training step's (bench/layer.py's row_name),
    and a forward mode of the backend's own in parentheses."""
    name = row["backend"] + (f"/{row['backward']}" if row.get("backward") else "")
    name += " frozen" if row.get("frozen") == "experts" else ""
    return name + (f" ({row['mode']})" if row.get("mode") not in (None, "fwd+bwd") else "")


def lines_of(rows: list[dict], preset: str, routing: str, mode: str) -> tuple[dict, dict]:
    """The rows of one panel -> ({label: sorted [(tokens, µs)]}, {tokens: floor µs}): passed and
    timed rows only; the floor from the panel's own mode (a training step's: bench/layer.py's
    floor_us, max(3 compute, 3 HBM, 2 NVLink))."""
    lines, floor = defaultdict(list), {}
    for r in rows:
        if (r["preset"], r["routing"], kind(r)) == (preset, routing, mode) and r.get("ok") and r.get("median_us"):
            lines[label(r)].append((r["tokens_per_rank"], r["median_us"]))
            floor.setdefault(r["tokens_per_rank"], r.get("floor_us"))
    return {k: sorted(v) for k, v in lines.items()}, floor


def plot(data: dict, out: str) -> str:
    """data: the benchmark's JSON ({"meta", "rows"}) -> the figure saved at `out`; -> out."""
    meta, rows = data["meta"], data["rows"]
    failed = [r for r in rows if not (r.get("ok") and r.get("median_us"))]
    per = "GPU" if meta["device"] != "cpu" else "rank"
    panels = sorted({(r["preset"], r["routing"]) for r in rows})
    modes = [(m, y) for m, y in MODES if any(kind(r) == m for r in rows)]
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(5 * len(panels), 4 * len(modes)), squeeze=False)
    for (mode, ylabel), axes_row in zip(modes, axes):
        for ax, (preset, routing) in zip(axes_row, panels):
            lines, floor = lines_of(rows, preset, routing, mode)
            for name, pts in sorted(lines.items()):
                ax.plot(*zip(*pts), marker="o", label=name)
            if floor and all(floor.values()):
                ax.plot(*zip(*sorted(floor.items())), "k--", label="physical floor")
            ax.set(yscale="log", xlabel=f"tokens per {per}", ylabel=ylabel,
                   title=f"{preset}, {routing} routing" + (", fwd+bwd" if mode == "fwd+bwd" else ""))
            ax.set_xscale("log", base=2)
            if floor:
                ax.set_xticks(sorted(floor), [str(t) for t in sorted(floor)])
            ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
            if lines:
                ax.legend()
    title = f"{meta['device']} x{meta['world']}  ({meta['date'][:10]}, commit {meta['commit']})"
    if failed:
        title += f"\nleft out, failed their check: {len(failed)} rows (" + ", ".join(sorted(
            {label(r) + (" +bwd" if kind(r) == "fwd+bwd" else "") for r in failed})) + ")"
    fig.suptitle(title)
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
