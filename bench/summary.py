"""The fused layer against the best peer at each point of one or more benchmark JSON files
(bench/layer.py --out): per point flash's time, each peer's, flash's speed-up over the fastest
peer and flash's fraction of the floor; then the geometric mean of the speed-ups and the worst
point. Issue 17's measure: never below 1.0x, at least 1.1x on the geometric mean.

    python bench/summary.py bench/results/<run>/sweep_*.json [--peers triton_kernels torch]"""

from __future__ import annotations

import argparse
import json
import math


def points(rows: list[dict], flash: str, peers: list[str]) -> list[dict]:
    """rows (bench/layer.py JSON rows; forward rows, not mode 'fwd+bwd') -> one dict per (preset,
    routing, tokens) where flash and at
    least one peer were timed: flash_us, {peer: us}, best peer, speedup = best peer's us / flash's,
    of_floor = floor / flash."""
    by_point: dict[tuple, dict] = {}
    for r in rows:
        if r.get("median_us") and r.get("ok") and r.get("mode") != "fwd+bwd":  # forwards only
            by_point.setdefault((r["preset"], r["routing"], r["tokens_per_rank"]), {})[r["backend"]] = r
    out = []
    for (preset, routing, tokens), got in by_point.items():
        timed = {p: got[p]["median_us"] for p in peers if p in got}
        if flash not in got or not timed:
            continue
        best = min(timed, key=timed.get)
        f = got[flash]
        out.append({"preset": preset, "routing": routing, "tokens": tokens, "flash_us": f["median_us"],
                    "peers_us": timed, "best": best, "speedup": timed[best] / f["median_us"],
                    "of_floor": (f["floor_us"] / f["median_us"]) if f.get("floor_us") else None})
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+")
    p.add_argument("--flash", default="flash")
    p.add_argument("--peers", nargs="+", default=["triton_kernels", "torch"])
    args = p.parse_args(argv)
    rows = [r for path in args.files for r in json.load(open(path))["rows"]]
    pts = points(rows, args.flash, args.peers)
    if not pts:
        raise SystemExit(f"no point has both {args.flash} and one of {args.peers} timed")
    print(f"{'preset':28s} {'tokens':>6s} {'flash µs':>10s} " + " ".join(f"{q:>15s}" for q in args.peers)
          + f" {'vs best':>8s} {'floor':>6s}")
    for q in pts:
        peers = " ".join(f"{q['peers_us'].get(name, float('nan')):15.1f}" for name in args.peers)
        floor = f"{q['of_floor']:6.0%}" if q["of_floor"] else "     -"
        print(f"{q['preset']:28s} {q['tokens']:6d} {q['flash_us']:10.1f} {peers} {q['speedup']:7.2f}x {floor}")
    worst = min(pts, key=lambda q: q["speedup"])
    print(f"geometric mean {geomean([q['speedup'] for q in pts]):.3f}x over {len(pts)} points; "
          f"worst {worst['speedup']:.2f}x ({worst['preset']}, {worst['tokens']} tokens, against {worst['best']}); "
          f"{sum(q['speedup'] < 1 for q in pts)} points below 1.0x")


if __name__ == "__main__":
    main()
