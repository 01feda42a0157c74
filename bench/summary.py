"""The fused layer against the best peer at each point of one or more benchmark JSON files
(bench/layer.py --out): per point flash's time, each peer's, flash's speed-up over the fastest
peer and flash's fraction of the floor; then the geometric mean of the speed-ups and the worst
point. Issue 17's measure: never below 1.0x, at least 1.1x on the geometric mean.

    python bench/summary.py bench/results/<run>/sweep_*.json [--peers triton_kernels torch symm_mem]

A point is (preset, routing, tokens per rank, world, device): rows of other worlds or devices are
never compared with each other; two rows of one backend at one point (two commits' files of
the same sweep, say), and rows of one point from different commits or of different configs (two
runs' files, or two custom shapes of one name), are refused: a ratio comes from one run. A point
where flash's row failed its check is listed as failed (not dropped); one where a peer's row
failed, or where flash has no row or a peer has none while it has rows elsewhere in the preset
(a point its run lost), is listed as incomplete (not compared with the next peer); one where no
peer has a row anywhere in its preset (every peer refused the preset's features, or their files
did not come back: the rows cannot tell which) as unpeered; all three counted beside the
geometric mean.

    python bench/summary.py FILES --fwd-bwd saved   # training steps (issue 19): flash against torch,
                                                     # both with backward="saved", and the floor's fraction

Several runs of the same points (on one kind of GPU, a point's ratio moves between runs: by a
median of 0.5% between two H100 runs of the same kernels and inputs, by up to 14% at one point,
bench/NOTES.md item 107), each run's files after its own --run:

    python bench/summary.py --run RUN1_FILES --run RUN2_FILES --run RUN3_FILES

Each run's ratios come from that run alone, as above; then per point its ratio in every run that
compared it (or why a run did not: flash failed, a peer failed or is missing, no peer, no row),
their median, and the runs where flash was behind; the geometric mean of the medians, the points
whose median is below 1.0x, those behind in every run, and those some run did not compare. A run
that compared a point against fewer peers than another run did is incomplete there (a note after
the table names such peers, and the --peers that leaves them out); a point of two configs in two
runs, and one run given twice, are refused."""

from __future__ import annotations

import argparse
import json
import math
import statistics

PEERS = ("triton_kernels", "torch", "symm_mem")  # bench/layer.py's peers of flash
POINT = ("preset", "routing", "tokens", "world", "device")  # an outcome's point, in point_key's order


def point_key(r: dict) -> tuple:
    """A row's point: (preset, routing, tokens per rank, world, device)."""
    return r["preset"], r["routing"], r["tokens_per_rank"], r.get("world"), r.get("device")


def timed_ok(r: dict) -> bool:
    """Whether a row passed its check and was timed."""
    return bool(r.get("ok")) and bool(r.get("median_us"))


def rows_by_point(rows: list[dict], training: str | None = None, frozen: bool = False) -> dict[tuple, dict]:
    """rows -> {point: {backend: row}} over forward rows (not mode 'fwd+bwd'), or with training (a
    backward mode, e.g. "saved") over the training steps run with that backward, those with the
    experts frozen (bench/layer.py --frozen-experts) where frozen, the others where not; failed ones
    included; ValueError for two rows of one backend at one point, or rows of one point from
    different commits or of different configs."""
    by_point: dict[tuple, dict] = {}
    for r in rows:
        if (r.get("mode") == "fwd+bwd") != (training is not None) or (training and r.get("backward") != training):
            continue
        if training and (r.get("frozen") == "experts") != frozen:
            continue
        got = by_point.setdefault(point_key(r), {})
        if r["backend"] in got:
            other = got[r["backend"]]
            raise ValueError(f"two {r['backend']} rows at {describe(point_key(r))} (commits {other.get('commit')} "
                             f"and {r.get('commit')}, dates {other.get('date')} and {r.get('date')}): give one "
                             "run's files")
        for other in got.values():
            for field in ("commit", "config"):
                if other.get(field) != r.get(field):
                    raise ValueError(f"{other['backend']} and {r['backend']} rows at {describe(point_key(r))} "
                                     f"differ in {field} ({other.get(field)} and {r.get(field)}): a ratio comes "
                                     "from one run of one config; give one run's files")
        got[r["backend"]] = r
    return by_point


def describe(key: tuple) -> str:
    preset, routing, tokens, world, device = key
    return f"{preset} {routing} {tokens} tokens, world {world}, {device}"


def outcomes(rows: list[dict], flash: str, peers: list[str], training: str | None = None,
             frozen: bool = False) -> dict[str, list[dict]]:
    """rows (bench/layer.py JSON rows; forward rows, or with training the training steps of that
    backward mode, with the experts frozen or not: rows_by_point) -> per point where flash or some
    peer in peers has a row:
      compared:   flash and every peer with a row there passed and were timed: flash_us, peers_us
                  {peer: us}, best peer, speedup = best peer's us / flash's, of_floor = floor / flash;
      failed:     flash's row failed its check (or was not timed): its rel_err;
      incomplete: flash passed, a peer's row failed, or a peer with rows at other points of this
                  preset, world and device has none here (its run crashed, or it refused that
                  token count; a peer that refuses the whole preset, as symm_mem does expert
                  biases, is simply not a peer there), or flash has none: failed_peers, the
                  backends missing or failed (not compared with the others, which may be the
                  weaker);
      unpeered:   flash has a row and no peer has one anywhere in this preset, world and
                  device (the peers refused the preset, or their files are missing).
    Each dict has preset, routing, tokens, world, device. No peers: nothing."""
    out: dict[str, list[dict]] = {"compared": [], "failed": [], "incomplete": [], "unpeered": []}
    if not peers:
        return out
    by_point = rows_by_point(rows, training, frozen)
    ran = {(key[0], key[3], key[4], b) for key, got in by_point.items() for b in got}  # preset, world, device
    for key, got in by_point.items():
        present = [p for p in peers if p in got]
        if flash not in got and not present:
            continue  # rows of other backends only: not a point of this comparison
        base = dict(zip(POINT, key))
        if flash in got and not timed_ok(got[flash]):
            out["failed"].append({**base, "rel_err": got[flash].get("rel_err")})
            continue
        if flash not in got:
            out["incomplete"].append({**base, "flash_us": None, "failed_peers": [flash]})
            continue
        if not any((key[0], key[3], key[4], p) in ran for p in peers):
            out["unpeered"].append({**base, "flash_us": got[flash]["median_us"]})
            continue
        f = got[flash]
        failed_peers = [p for p in present if not timed_ok(got[p])]
        failed_peers += [p for p in peers if p not in got and (key[0], key[3], key[4], p) in ran]
        if failed_peers:
            out["incomplete"].append({**base, "flash_us": f["median_us"], "failed_peers": failed_peers})
            continue
        timed = {p: got[p]["median_us"] for p in present}
        best = min(timed, key=timed.get)
        out["compared"].append({**base, "flash_us": f["median_us"], "peers_us": timed, "best": best,
                                "speedup": timed[best] / f["median_us"],
                                "of_floor": (f["floor_us"] / f["median_us"]) if f.get("floor_us") else None})
    return out


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def shape_name(q: dict) -> str:
    """A point's preset as the verdict lines name it, with its routing where not uniform."""
    return q["preset"] if q["routing"] == "uniform" else f"{q['preset']} {q['routing']}"


def point_name(q: dict) -> str:
    """A point as the verdict lines name it: shape_name and tokens."""
    return f"{shape_name(q)} {q['tokens']}"


def across_runs(runs: list[list[dict]], flash: str, peers: list[str], training: str | None = None,
                frozen: bool = False) -> list[dict]:
    """runs: each run's rows (outcomes' arguments otherwise) -> per point some run has rows of, in
    the order first met: preset, routing, tokens, world, device; each, one entry a run: its
    speedup where that run compared the point, else "failed", "incomplete" or "unpeered" as
    outcomes says, or None where the run has no row there; speedups (the compared ones, in the
    runs' order), median (of those; None if none), behind (how many are below 1.0x) and runs (how
    many runs were given). A run that compared a point against fewer peers than another run did
    there (the other peers' files not given, say) is incomplete there, not compared with the
    weaker peers. Each ratio comes from one run: ValueError for a run whose files mix runs
    (outcomes), for rows of one point of different configs in two runs (two custom shapes of one
    name), and for two runs holding rows of one commit and date (the same run given twice)."""
    stamps: dict[tuple, int] = {}
    for i, rows in enumerate(runs):
        for stamp in {(r.get("commit"), r.get("date")) for r in rows if r.get("date")}:
            if stamps.setdefault(stamp, i) != i:
                raise ValueError(f"runs {stamps[stamp] + 1} and {i + 1} both hold rows of commit {stamp[0]} dated "
                                 f"{stamp[1]}: the same run given twice")
    by_point: dict[tuple, dict] = {}
    configs: dict[tuple, tuple] = {}  # a point's config and the run it was first met in
    for i, rows in enumerate(runs):
        for key, got in rows_by_point(rows, training, frozen).items():
            config = next(iter(got.values())).get("config")
            first = configs.setdefault(key, (config, i))
            if first[0] != config:
                raise ValueError(f"{describe(key)} has rows of different configs in runs {first[1] + 1} and {i + 1} "
                                 f"({first[0]} and {config}): two shapes of one name are not one point")
        for status, found in outcomes(rows, flash, peers, training, frozen).items():
            for q in found:
                key = tuple(q[k] for k in POINT)
                point = by_point.setdefault(key, {**dict(zip(POINT, key)), "each": [None] * len(runs), "peers": set()})
                point["each"][i] = q if status == "compared" else status
                if status == "compared":
                    point["peers"] |= set(q["peers_us"])
    for point in by_point.values():
        each = [q if not isinstance(q, dict) else q["speedup"] if set(q["peers_us"]) == point["peers"]
                else "incomplete" for q in point.pop("each")]
        speedups = [v for v in each if isinstance(v, float)]
        point.pop("peers")
        point |= {"each": each, "speedups": speedups, "median": statistics.median(speedups) if speedups else None,
                  "behind": sum(v < 1.0 for v in speedups), "runs": len(runs)}
    return list(by_point.values())


def print_across_runs(runs: list[list[dict]], flash: str, peers: list[str], training: str | None,
                      frozen: bool) -> None:
    """across_runs' table and its verdict: the geometric mean of the medians of the points some
    run compared, the points whose median is below 1.0x, those behind in every run (every run
    compared them), those some run did not compare, and those where flash failed in some run."""
    pts = across_runs(runs, flash, peers, training, frozen)
    if not pts:
        raise SystemExit(f"no run has a point of {flash} and one of {peers}")
    commits = [sorted({r.get("commit") for r in rows if r.get("commit")}) for rows in runs]
    print("runs: " + "; ".join(f"{i + 1}: commit {', '.join(map(str, c)) or '?'}" for i, c in enumerate(commits)))
    print(f"{'preset':28s} {'routing':8s} {'tokens':>6s} {'world':>5s} {'device':14s} {'median':>7s} {'behind':>7s}"
          "  each run")
    for q in pts:
        each = " ".join(f"{v:.3f}x" if isinstance(v, float) else (v or "-") for v in q["each"])
        median = f"{q['median']:6.3f}x" if q["median"] is not None else "      -"
        print(f"{q['preset']:28s} {q['routing']:8s} {q['tokens']:6d} {q['world']!s:>5s} {q['device']!s:14.14s} "
              f"{median} {q['behind']:3d}/{len(q['speedups']):<3d}  {each}")
    compared = [q for q in pts if q["speedups"]]
    below = [q for q in compared if q["median"] < 1.0]
    always = [q for q in compared if q["behind"] == q["runs"]]
    partial = [q for q in pts if len(q["speedups"]) < q["runs"]]
    failed = [q for q in pts if "failed" in q["each"]]
    counts = f"{len(partial)} points compared in fewer runs than given ({flash} failed in some run at {len(failed)})"
    if not compared:
        print(f"no point compared in any run; {counts}")
        return
    names = ", ".join(point_name(q) for q in below)
    named = f" ({names})" if below else ""
    print(f"geometric mean of the medians {geomean([q['median'] for q in compared]):.3f}x over {len(compared)} points "
          f"and {len(runs)} runs; median below 1.0x at {len(below)}{named}; behind in every run at {len(always)}; "
          f"{counts}")


def print_peers_of_some_runs(kept: list[dict]) -> None:
    """After a table of several runs (each run's points: {point: {backend: row}}): the peers some
    runs have rows of and others lack (each point of a run without one is incomplete against it),
    and the --peers that compares every run with the peers all of them have."""
    have = [{b for got in run.values() for b in got if b in PEERS} for run in kept]
    common, partial = set.intersection(*have), sorted(set.union(*have) - set.intersection(*have))
    if partial:
        hint = (f"--peers {' '.join(b for b in PEERS if b in common)} compares each run with the peers every run has"
                if common else "no peer has rows in every run")
        print(f"note: {', '.join(partial)} has rows in some runs only (their points are incomplete in the others); "
              f"{hint}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="one run's files (or give --run for each of several runs)")
    p.add_argument("--run", nargs="+", action="append", default=[], metavar="FILE",
                   help="one run's files; give it once a run to compare several runs of the same points")
    p.add_argument("--flash", default="flash")
    p.add_argument("--peers", nargs="+", default=None,
                   help=f"default: those of {list(PEERS)} with rows in the files (of the training steps asked for)")
    p.add_argument("--fwd-bwd", default=None, metavar="BACKWARD",
                   help="the training steps (mode fwd+bwd) run with this backward, e.g. saved, not the forwards")
    p.add_argument("--frozen-experts", action="store_true",
                   help="with --fwd-bwd, the steps with the experts' weights frozen (bench/layer.py --frozen-experts)")
    args = p.parse_args(argv)
    if args.frozen_experts and not args.fwd_bwd:
        p.error("--frozen-experts compares training steps: give --fwd-bwd BACKWARD too")
    if bool(args.files) == bool(args.run):
        p.error("give one run's files, or each run's after its own --run, not both")
    runs = [[r for path in files for r in json.load(open(path))["rows"]] for files in (args.run or [args.files])]
    try:
        kept = [rows_by_point(rows, args.fwd_bwd, args.frozen_experts) for rows in runs]
        peers = args.peers or [b for b in PEERS if any(b in got for run in kept for got in run.values())]
        if args.run:
            print_across_runs(runs, args.flash, peers, args.fwd_bwd, args.frozen_experts)
            if not args.peers:
                print_peers_of_some_runs(kept)
            return
        got = outcomes(runs[0], args.flash, peers, args.fwd_bwd, args.frozen_experts)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    pts, failed, incomplete, unpeered = got["compared"], got["failed"], got["incomplete"], got["unpeered"]
    if not (pts or failed or incomplete or unpeered):
        raise SystemExit(f"no point has rows of both {args.flash} and one of {peers}")
    print(f"{'preset':28s} {'routing':8s} {'tokens':>6s} {'world':>5s} {'device':14s} {'flash µs':>10s} "
          + " ".join(f"{q:>15s}" for q in peers) + f" {'vs best':>8s} {'floor':>6s}")
    for q in pts:
        times = " ".join(f"{q['peers_us'].get(name, float('nan')):15.1f}" for name in peers)
        floor = f"{q['of_floor']:6.0%}" if q["of_floor"] else "     -"
        print(f"{q['preset']:28s} {q['routing']:8s} {q['tokens']:6d} {q['world']!s:>5s} {q['device']!s:14.14s} "
              f"{q['flash_us']:10.1f} "
              f"{times} {q['speedup']:7.2f}x {floor}")
    for q in failed:
        print(f"FAILED      {describe(tuple(q[k] for k in POINT))}: "
              f"{args.flash} failed its check (rel_err {q['rel_err']})")
    for q in incomplete:
        print(f"INCOMPLETE  {describe(tuple(q[k] for k in POINT))}: "
              f"{', '.join(q['failed_peers'])} failed its check or has no row; not compared")
    for q in unpeered:
        print(f"UNPEERED    {describe(tuple(q[k] for k in POINT))}: "
              f"no row of {', '.join(peers)} in this preset (refused, or its file is missing); not compared")
    counts = (f"{len(failed)} points where {args.flash} failed, {len(incomplete)} incomplete (a peer failed or "
              f"is missing), {len(unpeered)} with no peer's row in their preset")
    if not pts:
        print(f"no point compared; {counts}")
        return
    worst = min(pts, key=lambda q: q["speedup"])
    floors = [q for q in pts if q["of_floor"]]
    lowest = min(floors, key=lambda q: q["of_floor"]) if floors else None
    floor = (f"lowest fraction of the floor {lowest['of_floor']:.0%} ({shape_name(lowest)}, {lowest['tokens']} "
             "tokens); ") if lowest else ""
    print(f"geometric mean {geomean([q['speedup'] for q in pts]):.3f}x over {len(pts)} points; "
          f"worst {worst['speedup']:.2f}x ({shape_name(worst)}, {worst['tokens']} tokens, against {worst['best']}); "
          f"{sum(q['speedup'] < 1 for q in pts)} points below 1.0x; {floor}{counts}")


if __name__ == "__main__":
    main()
