"""GPU: bad input, NaN/Inf, capacity drops and heap sizing with backend="flash", on every GPU:

    bash launch/torchrun.sh tests/gpu/check_inputs.py [--out results.json]

Each case: one rank misbehaves, the others must still get correct outputs from the same collective
forward (no hang), the misbehaving rank gets the documented error or result, and the layer works
afterwards. Fresh random inputs, outputs compared with the float32 reference. Exit 1 on any failure."""

import argparse
import json
import random
import sys

import torch
import torch.distributed as dist

import flashmoe_py as fm
from flashmoe_py.reference import reference_routing
from flashmoe_py.runtime import detect_launcher

MAX_TOKENS = 128


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def all_true(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


class Case:
    def __init__(self, layer, full, cfg, rank, gen):
        self.layer, self.full, self.cfg, self.rank, self.gen = layer, full, cfg, rank, gen

    def x(self, T):
        return torch.randn(T, self.cfg.hidden_size, generator=self.gen).to("cuda", self.cfg.torch_dtype)

    def good(self, T=None):
        """One forward with fresh input; -> relative error against the reference."""
        x = self.x(T or MAX_TOKENS)
        return rel_err(self.layer(x), fm.reference_forward(x, config=self.cfg, **self.full))

    def bad_rank(self, name, bad_input, expect_error: str, error=ValueError):
        """Rank 0 passes bad_input (and must get `error` containing expect_error); the others
        run a good forward at the same time and must match the reference; then everyone runs a
        good one."""
        ok, note = True, ""
        if self.rank == 0:
            try:
                self.layer(bad_input)
                ok, note = False, "no error"
            except error as e:
                note = str(e)
                ok = expect_error in note
        else:
            ok = self.good() <= 1e-2
        ok = (self.good() <= 1e-2) and ok  # every rank runs the collective forward, whatever ok is
        self.layer.synchronize()
        return {"case": name, "ok": all_true(ok), "rank0_error": note}


def main():
    torch.set_grad_enabled(False)  # inference checks: no graph, nothing saved for a backward
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    world = detect_launcher().world_size
    cfg = fm.MoEConfig(hidden_size=256, ffn_size=384, num_experts=4 * world, top_k=2)
    capped = cfg.replace(capacity_factor=1.0)
    rt = fm.init(layers=[(cfg, MAX_TOKENS), (capped, MAX_TOKENS), (cfg, MAX_TOKENS)])
    rank = rt.rank
    seed = random.SystemRandom().randrange(2**31)
    seed_t = torch.tensor([seed], device="cuda")
    dist.broadcast(seed_t, 0)
    seed = int(seed_t)
    layer = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=MAX_TOKENS, seed=seed, timeout_s=5.0)
    c = Case(layer, layer.full_weight_dict(), cfg, rank, torch.Generator().manual_seed(seed + rank))
    rows = []
    H = cfg.hidden_size

    rows.append(c.bad_rank("wrong dtype", c.x(64).float(), "dtype"))
    rows.append(c.bad_rank("wrong hidden size", torch.randn(64, H + 1, device="cuda", dtype=torch.bfloat16),
                           "hidden_size"))
    rows.append(c.bad_rank("on the CPU", c.x(64).cpu(), "cpu"))
    rows.append(c.bad_rank("more tokens than max_tokens_per_rank", c.x(MAX_TOKENS + 1),
                           f"max_tokens_per_rank={MAX_TOKENS}"))
    try:  # every rank: a refusal before any symmetric allocation, so none waits on another
        fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=MAX_TOKENS, backward="autograd")
        rows.append({"case": "backward='autograd' refused", "ok": all_true(False), "error": "none"})
    except ValueError as e:
        rows.append({"case": "backward='autograd' refused", "ok": all_true("backward='autograd'" in str(e)),
                     "error": str(e)})

    # Non-contiguous input is accepted (copied contiguous) and correct.
    x = c.x(2 * MAX_TOKENS)[::2]
    err = rel_err(layer(x), fm.reference_forward(x, config=cfg, **c.full))
    rows.append({"case": "non-contiguous input", "ok": all_true(err <= 1e-2), "rel_err": err})

    # [batch, seq, H] input keeps its shape.
    x = c.x(MAX_TOKENS).view(4, MAX_TOKENS // 4, H)
    out = layer(x)
    err = rel_err(out.view(-1, H), fm.reference_forward(x.view(-1, H), config=cfg, **c.full))
    rows.append({"case": "[batch, seq, H] input", "ok": all_true(out.shape == x.shape and err <= 1e-2),
                 "rel_err": err})

    # NaN / Inf in one token's activations on rank 0: that token's output is non-finite, every
    # other token (on every rank) is still correct, nothing hangs.
    x = c.x(MAX_TOKENS)
    if rank == 0:
        x[3, 5] = float("nan")
        x[7, 0] = float("inf")
    out = layer(x)
    ref = fm.reference_forward(x, config=cfg, **c.full)
    finite = ref.isfinite().all(dim=1)
    ok = bool(out[finite].isfinite().all()) and rel_err(out[finite], ref[finite]) <= 1e-2
    if rank == 0:
        ok = ok and not bool(out[3].isfinite().all()) and not bool(out[7].isfinite().all())
    layer.synchronize()
    rows.append({"case": "NaN/Inf in activations propagate to their tokens only",
                 "ok": all_true((c.good() <= 1e-2) and ok)})

    # Inf in the router: every token's routing is NaN; the forward completes with NaN outputs
    # (routing picks some expert for each slot) and the layer is fine once the router is restored.
    saved = layer.router_weight.detach().clone()
    with torch.no_grad():
        layer.router_weight[0] = float("inf")
    out = layer(c.x(MAX_TOKENS))
    layer.synchronize()
    nan_out = not bool(out.isfinite().any())
    with torch.no_grad():
        layer.router_weight.copy_(saved)
    rows.append({"case": "Inf router weight: NaN outputs, no hang, recovers",
                 "ok": all_true((c.good() <= 1e-2) and nan_out)})

    # Capacity: dropped token-slots are counted exactly (the reference's count) and the kept
    # slots are combined as in the reference.
    clayer = fm.MoELayer(capped, backend="flash", max_tokens_per_rank=MAX_TOKENS, seed=seed)
    with torch.no_grad():  # a hot expert, so the capacity binds
        clayer.router_weight[1] += 0.3 * clayer.router_weight.abs().mean()
    cfull = clayer.full_weight_dict()
    x = c.x(MAX_TOKENS).abs()
    out = clayer(x)
    _, _, kept = reference_routing(x, cfull["router_weight"], capped)
    dropped = int(clayer.last_stats.dropped_slots)
    err = rel_err(out, fm.reference_forward(x, config=capped, **cfull))
    rows.append({"case": "capacity 1.0: dropped slots counted exactly",
                 "ok": all_true(dropped == int((~kept).sum()) and dropped > 0 and err <= 1e-2),
                 "dropped_rank0": dropped, "expected_rank0": int((~kept).sum()), "rel_err": err})
    dl = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=MAX_TOKENS, seed=seed)
    dl(x)
    rows.append({"case": "dropless: nothing dropped", "ok": all_true(int(dl.last_stats.dropped_slots) == 0)})

    # A layer whose buffers do not fit the heap left is refused on every rank, before any
    # allocation, with the sizes; the heap stays usable.
    used = rt.heap_used()
    try:
        fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=1 << 20)
        note, ok = "no error", False
    except RuntimeError as e:
        note, ok = str(e), "need" in str(e) and "free" in str(e)
    ok = (c.good() <= 1e-2) and ok and rt.heap_used() == used
    rows.append({"case": "heap too small: refused with sizes", "ok": all_true(ok), "error": note})

    for r in rows:
        if rank == 0:
            print(json.dumps(r), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "world": world, "rows": rows}, f, indent=1)
    fm.finalize()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
