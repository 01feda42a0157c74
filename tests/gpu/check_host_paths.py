"""GPU, one process: the fused backend's host-side guarantees that only a GPU can show.

- Weights replaced (not updated in place) after a forward was captured in a CUDA graph: the graph
  is dropped, and the next forwards (eager, captured, replayed) compute with the new weights; the
  old weights' memory is poisoned with NaN first, so a graph still reading it fails the case. A
  weight then updated in place is seen by the replays.
- Forwards of one layer queued on two streams, with no caller synchronisation between them,
  launched and replayed from CUDA graphs: the layer orders them (they share one workspace), so
  every output is its input's.
- A training forward that timed out (a launch whose static GEMM1 order waits for programs that
  have no SM), its status landed on the host: the explicit backward raises FusedKernelError rather
  than returning gradients computed from what that forward saved. Last, since a failure leaves
  the runtime failed.
- A float32 layer's training step under a bfloat16 torch.autocast (forward and backward inside
  it) gives what it gives without: the layer computes in its own dtype.
- Under torch.use_deterministic_algorithms, backward="saved" steps on the same inputs give the same
  bits every time, launched and replayed (CUBLAS_WORKSPACE_CONFIG is set here, as torch asks of
  anything that reaches cuBLAS then).
- Training forwards replayed from a CUDA graph on alternating streams, every backward after the
  last forward: each replay copies out what the one before saved, and that one's backward, on
  its own stream, reads the copies.
- The placement's buffers (expert_positions, which routes every token, and expert_ids) written in
  place or replaced after forwards were captured and replayed: the next forward refuses them (a
  GPU buffer is read again when its version or identity changes, not every call), and once they
  hold the placement's values again the forwards compute right. A DTensor x is refused.
- A fused layer deleted after its forwards (launched, captured, replayed): its symmetric buffers go
  back to the heap when the next layer is built, so a second layer of the same size fits a heap
  sized for one, and computes right.

- The call numbers the kernel's flags carry restarted every 3 forwards (EPOCH_RESTART lowered on
  the instance), launched, captured and replayed: every output right. Then a call numbered past
  EPOCH_LAST, as replays of a graph the caller captured would leave it: the kernel computes nothing
  and the layer raises FusedKernelError naming it (the layer is failed: near the end).

Every output is checked against the float32 reference on fresh random inputs (NaN counts as inf).

    python tests/gpu/check_host_paths.py [--out rows.json]"""

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
from grad_reference import grad_errors, reference_grads, rel_err  # noqa: E402
from seeds import fresh_seed  # noqa: E402

import flashmoe_py as fm
from flashmoe_py import FusedKernelError, MoEConfig, MoELayer, reference_forward
from flashmoe_py.kernels.layout import EPOCH_LAST, heap_bytes_for

TOL = 1e-2  # bf16
FP32_TOL = 1e-4  # float32 on a GPU (the project's bar for its GPU kernels)
SMALL = MoEConfig(hidden_size=256, ffn_size=384, num_experts=8, top_k=2)
WIDE = MoEConfig(hidden_size=1024, ffn_size=512, num_experts=16, top_k=4)  # long enough calls to overlap


class Inputs:
    """Fresh random bf16 inputs [T, H] on the GPU."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, cfg: MoEConfig, tokens: int) -> torch.Tensor:
        return torch.randn(tokens, cfg.hidden_size, generator=self.gen).to("cuda", cfg.torch_dtype)


def replaced_weights(inputs: Inputs, seed: int) -> dict:
    tokens = 200
    layer = MoELayer(SMALL, backend="flash", max_tokens_per_rank=tokens, seed=seed)
    errs = []

    def call() -> None:  # eager the first time at a size, then captured, then replayed
        x = inputs(SMALL, tokens)
        out = layer(x)
        errs.append(rel_err(out, reference_forward(x, config=SMALL, **layer.full_weight_dict())))

    for _ in range(3):
        call()
    graphs_before = len(layer.backend.graphs)
    old = {n: getattr(layer, n) for n in ("w_in", "w_out", "router_weight")}
    gen = torch.Generator().manual_seed(seed + 1)
    for n, p in old.items():
        setattr(layer, n, torch.nn.Parameter(
            (torch.randn(p.shape, generator=gen) * float(p.float().std())).to(p.device, p.dtype)))
    for p in old.values():
        p.data.fill_(float("nan"))  # a graph still reading the old memory reads NaN
    for _ in range(3):
        call()
    layer.w_out.data.mul_(-1.5)  # in place: the kept graph reads it
    call()
    layer.synchronize()
    graphs_after = len(layer.backend.graphs)
    layer.backend.close()
    worst = max(errs)
    return {"case": "weights replaced after a capture, then updated in place", "rel_errs": errs,
            "graphs_before": graphs_before, "graphs_after": graphs_after, "rel_err": worst,
            "ok": worst <= TOL and graphs_before == 1 and graphs_after == 1}


def two_streams(inputs: Inputs, seed: int, graphs: bool, calls: int = 12) -> dict:
    """graphs: replayed from the layer's CUDA graphs after the first two calls (the capture itself
    synchronises the device), or every call launched."""
    tokens = 2048
    layer = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed, cuda_graphs=graphs)
    xs = [inputs(WIDE, tokens) for _ in range(calls)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())  # the inputs are written
    outs = []
    for i, x in enumerate(xs):
        with torch.cuda.stream(streams[i % 2]):
            outs.append(layer(x))
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    layer.synchronize()
    full = layer.full_weight_dict()
    errs = [rel_err(out, reference_forward(x, config=WIDE, **full)) for x, out in zip(xs, outs)]
    layer.backend.close()
    return {"case": f"{calls} forwards on two streams, alternating, no caller synchronisation, "
                    f"{'CUDA graphs' if graphs else 'launched'}",
            "rel_errs": errs, "rel_err": max(errs), "ok": max(errs) <= TOL}


def under_autocast(inputs: Inputs, seed: int) -> dict:
    """Nothing the fused path computes on a GPU is an op autocast casts (its products are Triton's),
    and on an H200 neither was any of backend torch's at float32 (the router kernel's, then
    torch._grouped_mm's): with the layer's guard removed both backends' rows passed (bench/NOTES.md
    items 78, 79). So this row checks the float32 step end to end: under autocast against the same
    step without it, and a step under autocast against the float64 reference (every gradient at
    the GPU's float32 bar, FP32_TOL); the guard's own test is the CPU one in tests/test_layer.py."""
    cfg, tokens = MoEConfig(**{**SMALL.to_dict(), "dtype": "float32"}), 200
    layer = MoELayer(cfg, backend="flash", max_tokens_per_rank=tokens, seed=seed, backward="saved")
    x = inputs(cfg, tokens).requires_grad_()
    dy = inputs(cfg, tokens)
    got = {}
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
            (out * dy).sum().backward()  # inside too: the explicit backward turns it off as well
        got[autocast] = [out.detach(), x.grad, *(p.grad for p in layer.parameters())]
        x.grad = None
        layer.zero_grad()
    errs = [rel_err(a, b) for a, b in zip(got[True], got[False], strict=True)]

    def step():  # under autocast; grad_errors takes the reference outside it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            (layer(x) * dy).sum().backward()
    ref_errs = grad_errors(layer, x, dy, step=step)
    worst = max(e for e in ref_errs.values() if e is not None)
    layer.backend.close()
    return {"case": "float32 training step under a bfloat16 autocast against one without (the layer ignores it), "
                    "and against the float64 reference",
            "rel_errs": errs, "rel_err": max(errs), "reference_rel_errs": ref_errs, "reference_rel_err": worst,
            "dtype": str(got[True][0].dtype),
            "ok": max(errs) <= 1e-5 and worst <= FP32_TOL and got[True][0].dtype == torch.float32}


def deterministic_steps(inputs: Inputs, seed: int, steps: int = 6) -> dict:
    """Without torch.use_deterministic_algorithms, how many of the later steps differ from the
    first in some bit is recorded, not judged (the routing plan's atomic counter orders an
    expert's rows as the GPU schedules it); with it, none may. The first two steps at a size are
    launched, the rest replayed from the layer's CUDA graph (dropped when the setting switches)."""
    tokens = 2048  # 512 rows an expert: many atomic increments per counter
    layer = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed, backward="saved")
    x = inputs(WIDE, tokens).requires_grad_()
    dy = inputs(WIDE, tokens)

    def step() -> list[torch.Tensor]:
        out = layer(x)
        (out * dy).sum().backward()
        got = [out.detach(), x.grad, *(p.grad for p in layer.parameters())]
        x.grad = None
        layer.zero_grad()
        return got

    differing = {}
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        first = step()
        differing[deterministic] = sum(any(not torch.equal(a, b) for a, b in zip(first, step(), strict=True))
                                       for _ in range(steps - 1))
    errs = grad_errors(layer, x, dy)  # still deterministic
    torch.use_deterministic_algorithms(False)
    layer.backend.close()
    worst = max(e for e in errs.values() if e is not None)
    return {"case": f"{steps} backward='saved' steps on the same inputs, bit for bit, under "
                    "torch.use_deterministic_algorithms", "steps_differing_without": differing[False],
            "steps_differing_with": differing[True], "rel_errs": errs, "rel_err": worst,
            "ok": differing[True] == 0 and worst <= TOL}


def forwards_on_two_streams_then_backwards(inputs: Inputs, seed: int, steps: int = 6) -> dict:
    tokens = 512
    layer = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed, backward="saved")
    xs = [inputs(WIDE, tokens).requires_grad_() for _ in range(steps)]
    dys = [inputs(WIDE, tokens) for _ in range(steps)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())  # the inputs are written
    losses = []
    for i, (x, dy) in enumerate(zip(xs, dys)):
        with torch.cuda.stream(streams[i % 2]):
            # the copies of the last forward's saved tensors come late on this stream: that forward's
            # backward, issued next on the other stream, would read them unwritten if it did not wait
            torch.cuda._sleep(50_000_000)
            losses.append((layer(x) * dy).sum())
        if i:
            with torch.cuda.stream(streams[(i - 1) % 2]):  # each backward on its forward's stream
                losses[i - 1].backward()
    with torch.cuda.stream(streams[(steps - 1) % 2]):
        losses[-1].backward()
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    layer.synchronize()
    errs = [rel_err(x.grad, reference_grads(layer, x, dy)["x"]) for x, dy in zip(xs, dys)]
    layer.backend.close()
    return {"case": f"{steps} training forwards on two streams (eager, captured, then replayed), each backward "
                    "right after the next forward: each x's gradient", "rel_errs": errs, "rel_err": max(errs),
            "ok": max(errs) <= TOL}


def placement_buffers(inputs: Inputs, seed: int) -> dict:
    tokens = 200
    layer = MoELayer(SMALL, backend="flash", max_tokens_per_rank=tokens, seed=seed)
    full = layer.full_weight_dict()
    errs, refused = [], {}

    def call() -> None:  # eager the first time at a size, then captured, then replayed
        x = inputs(SMALL, tokens)
        errs.append(rel_err(layer(x), reference_forward(x, config=SMALL, **full)))

    for _ in range(3):
        call()
    for name in ("expert_positions", "expert_ids"):
        placed = getattr(layer, name).clone()
        for how in ("written in place", "replaced"):
            if how == "replaced":
                setattr(layer, name, placed.flip(0).clone())
            else:
                getattr(layer, name).copy_(placed.flip(0))
            try:
                call()
                refused[f"{name} {how}"] = ""
            except RuntimeError as e:
                refused[f"{name} {how}"] = str(e)
            getattr(layer, name).copy_(placed)  # the placement's again: taken
            for _ in range(3):
                call()
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    x = DTensor.from_local(inputs(SMALL, tokens), init_device_mesh("cuda", (1,)), [Replicate()], run_check=False)
    try:
        layer(x)
        refused["DTensor x"] = ""
    except ValueError as e:
        refused["DTensor x"] = str(e)
    layer.synchronize()
    layer.backend.close()
    return {"case": "placement buffers written or replaced after captures, then put back; a DTensor x",
            "refused": refused, "rel_errs": errs, "rel_err": max(errs),
            "ok": max(errs) <= TOL and len(errs) == 15 and all(
                f"{what.split()[0]} holds" in msg or (what == "DTensor x" and "x is a DTensor" in msg)
                for what, msg in refused.items())}


def deleted_layer_heap(inputs: Inputs, seed: int) -> dict:
    tokens, rt = 2048, fm.runtime.current()
    before = rt.heap_used()
    layer = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed)
    for _ in range(3):  # eager, captured, replayed
        layer(inputs(WIDE, tokens))
    held = rt.heap_used()
    del layer
    gc.collect()
    try:
        again = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed + 1)
    except RuntimeError as e:
        return {"case": "a deleted layer's buffers back for the next one", "error": str(e), "ok": False}
    x = inputs(WIDE, tokens)
    err = rel_err(again(x), reference_forward(x, config=WIDE, **again.full_weight_dict()))
    again.synchronize()
    again.backend.close()
    return {"case": "a deleted layer's buffers back for the next one (the heap holds one)", "heap_held": held,
            "heap_after": rt.heap_used(), "rel_err": err,
            "ok": err <= TOL and held > before and rt.heap_used() == before}


def restarted_call_numbers(inputs: Inputs, seed: int) -> dict:
    tokens = 200
    layer = MoELayer(SMALL, backend="flash", max_tokens_per_rank=tokens, seed=seed)
    backend = layer.backend
    backend.EPOCH_RESTART = 3  # (EPOCH_LAST otherwise)
    errs, numbers = [], []
    for i in range(10):  # two sizes, each eager, captured, then replayed
        x = inputs(SMALL, tokens if i % 2 else 120)
        errs.append(rel_err(layer(x), reference_forward(x, config=SMALL, **layer.full_weight_dict())))
        numbers.append(int(backend.ws.scratch.ctl[0]))  # the next call's number
    layer.synchronize()
    backend.ws.scratch.ctl[0] = EPOCH_LAST.value + 1  # as replays of a graph the caller captured would leave it
    layer(inputs(SMALL, tokens))  # replayed from the layer's graph
    try:
        layer.synchronize()
        raised = ""
    except FusedKernelError as e:
        raised = str(e)
    layer.backend.close()
    worst = max(errs)
    return {"case": "the call numbers restarted every 3 forwards (eager, captured, replayed); a call past EPOCH_LAST "
            "refused", "rel_errs": errs, "next_numbers": numbers, "raised": raised, "rel_err": worst,
            "ok": (worst <= TOL and numbers == [2, 3, 4] * 3 + [2]
                   and f"computed nothing in call {EPOCH_LAST.value + 1}" in raised)}


def backward_after_timeout(inputs: Inputs, seed: int) -> dict:
    tokens, timeout_s = 2048, 1.0
    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    layer = MoELayer(WIDE, backend="flash", max_tokens_per_rank=tokens, seed=seed, timeout_s=timeout_s,
                     backward="saved", cuda_graphs=False,
                     launch_override={"programs": programs, "static_ffn_in": 1})
    x = inputs(WIDE, tokens).requires_grad_()
    t0 = time.perf_counter()
    out = layer(x)
    torch.cuda.synchronize()  # the status has landed
    seconds = time.perf_counter() - t0
    try:
        out.float().sum().backward()
        raised = ""
    except FusedKernelError as e:
        raised = str(e)
    # (the time includes this launch's compilation: check_timeouts holds the bounds)
    return {"case": "backward after a training forward that timed out", "seconds_to_forward_end": round(seconds, 3),
            "raised": raised, "x_grad_written": x.grad is not None,
            "ok": "timed out" in raised and x.grad is None and seconds >= timeout_s}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    seed = fresh_seed()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic_steps
    # room for one layer at a time, and for restarted_call_numbers' failed layer beside the last one
    # (a failed runtime keeps a freed layer's buffers on the heap)
    fm.init(heap_bytes=max(heap_bytes_for(c, 1, 2048, "p2p") for c in (SMALL, WIDE))
            + heap_bytes_for(SMALL, 1, 200, "p2p"))
    inputs = Inputs(seed)
    rows = []
    with torch.no_grad():
        rows.append(replaced_weights(inputs, seed))
        print(json.dumps(rows[-1]), flush=True)
        for graphs in (False, True):
            rows.append(two_streams(inputs, seed + 2, graphs))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(under_autocast(inputs, seed + 4))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(deterministic_steps(inputs, seed + 5))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(forwards_on_two_streams_then_backwards(inputs, seed + 6))
    print(json.dumps(rows[-1]), flush=True)
    with torch.no_grad():
        rows.append(placement_buffers(inputs, seed + 7))
        print(json.dumps(rows[-1]), flush=True)
        rows.append(deleted_layer_heap(inputs, seed + 8))
    print(json.dumps(rows[-1]), flush=True)
    with torch.no_grad():
        rows.append(restarted_call_numbers(inputs, seed + 9))
    print(json.dumps(rows[-1]), flush=True)
    rows.append(backward_after_timeout(inputs, seed + 3))
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "seed": seed, "rows": rows}, f,
                      indent=1)
    fm.finalize()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
