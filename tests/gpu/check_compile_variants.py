"""GPU, one process: FlashBackend.compile_variants leaves no fused kernel variant for a forward to
compile. A layer on several GPUs runs it when built, so that no rank compiles a variant (seconds,
bench/NOTES.md item 84) while its peers' kernels wait for it; at world 1 it is called here by hand.

With Triton's cache in a new, empty directory: one forward of FIRST tokens compiles the router and
plan kernels and the fused kernel's variant of few rows an expert; compile_variants then compiles
the others (the static GEMM1 order and the tall tiles from 64 rows an expert, two-column
combine tasks from 128, four-column ones from 4,096 tokens), each also as a training forward of
backward="saved" saves. The first forwards at SIZES, under no_grad and then recording a graph
(the saving builds), must then take no compile's time (each under QUICK_S; the fused kernel's
compile takes 3.5-9 s on an H100's host, the router and plan kernels' 0.3-1.7 s) and match the
float32 reference (bf16 bar 1e-2). The routers split their dot up to 512 tokens as a router
of 512 KiB or more does (SPLIT_MIN_BYTES set to 0 here: these are 64-128 KB), so
router_partial_kernel is among the kernels checked. SIZES: 37 and 528 tokens are counts of a
class Triton would have specialised the router and plan kernels on (1, a multiple of 16, neither)
that neither the first forward (16 tokens) nor compile_variants' runs of them (at 1 and 513
tokens) met, on either side of the router's split size (512 tokens); 300 takes the router's
chunk count past 128 tokens (8 chunks, where 16 divide by 16: another class); 520, 2,047 and
4,096 reach the fused kernel's other variants (4,096 the router's launch past 2,048 tokens too); 1
is the control layer's first count of its class. They take every token count as one. A
layer of 64 experts, top-8 (variants of its own: the expert count and top-k are the kernel's
constants; the same rows an expert at each size), not asked to compile them, shows what that time
is: its first forward at a size whose fused variant is new to it (520, 2,047 and 4,096 tokens,
and as training forwards, whose saving builds are all new to it, 1, 520, 2,047 and 4,096) must
take SLOW_S or more (else the check could not tell the two layers apart), and under no_grad at the others,
whose variants an earlier forward compiled, under QUICK_S.

    python tests/gpu/check_compile_variants.py [--out rows.json]"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")  # before triton: nothing cached

import torch  # noqa: E402

import flashmoe_py as fm  # noqa: E402
from flashmoe_py import MoEConfig, MoELayer, reference_forward  # noqa: E402
from flashmoe_py.kernels import router  # noqa: E402
from flashmoe_py.kernels.launch_config import choose_launch, launch_variants  # noqa: E402
from flashmoe_py.kernels.layout import heap_bytes_for  # noqa: E402

CONFIGS = {True: MoEConfig(hidden_size=1024, ffn_size=768, num_experts=32, top_k=4, dtype="bfloat16"),
           False: MoEConfig(hidden_size=1024, ffn_size=768, num_experts=64, top_k=8, dtype="bfloat16")}
MAX_TOKENS = 4096
FIRST = 16  # 2 rows an expert: few rows' variant, compiled by the first forward
# rows an expert: 0-37 (FIRST's fused variant) at 1, 37 and 300, 65-66 (the static order, tall tiles), 255 (combine
# tasks of two column tiles too), 512 (four column tiles)
SIZES = (1, 37, 300, 520, 528, 2047, 4096)
QUICK_S, SLOW_S = 0.2, 1.0  # a warm first forward takes milliseconds


def first_forwards(layer: MoELayer, seed: int, training: bool) -> list[dict]:
    """The first forward at each of SIZES (after one at FIRST, under no_grad): its seconds, its
    error, and whether its fused kernel variant is one the layer had not launched before (FIRST's,
    or an earlier size's). training: forwards that record a graph (x requires grad), which with
    backward="saved" launch each variant's saving build, one no forward before them launched."""
    cfg, gen, b = layer.config, torch.Generator().manual_seed(seed), layer.backend

    def launch(tokens: int):
        return choose_launch(b.geo, tokens, torch.bfloat16, b.programs, b.options.launch_override, b.resident)

    rows, launched = [], [] if training else [launch(FIRST)]
    for tokens in SIZES:
        x = torch.randn(tokens, cfg.hidden_size, generator=gen).to("cuda", torch.bfloat16).requires_grad_(training)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(training):
            out = layer(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ref = reference_forward(x.detach().float(), config=cfg, **layer.full_weight_dict())
        err = float((out.detach().float() - ref).norm() / ref.norm())
        rows.append({"tokens": tokens, "training": training, "first_call_s": round(seconds, 3), "rel_err": err,
                     "new_fused_variant": launch(tokens) not in launched})
        launched.append(launch(tokens))
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    router.SPLIT_MIN_BYTES = 0  # the split router up to 512 tokens, as a large router takes it
    fm.init(heap_bytes=sum(heap_bytes_for(cfg, 1, MAX_TOKENS, "p2p") for cfg in CONFIGS.values()))
    variants = None  # the fused kernel's: each launch, and each again as a saving forward (backward="saved")
    results = []
    for compiled, cfg in CONFIGS.items():
        layer = MoELayer(cfg, max_tokens_per_rank=MAX_TOKENS, backend="flash", seed=1234 + compiled)
        with torch.no_grad():
            layer(torch.randn(FIRST, cfg.hidden_size, device="cuda", dtype=torch.bfloat16))
            start = time.perf_counter()
            if compiled:
                layer.backend.compile_variants()
                b = layer.backend
                launches = launch_variants(b.geo, torch.bfloat16, b.programs, b.options.launch_override, b.resident)
                variants = len(launches) * (2 if b.options.backward_for(b.name) == "saved" else 1)
            compile_s = time.perf_counter() - start
            rows = first_forwards(layer, seed=99 + compiled, training=False)
        rows += first_forwards(layer, seed=199 + compiled, training=True)  # the saving builds
        # compiled ahead: no first forward compiles; the other layer's show the compile avoided where
        # its fused variant is new (else this check could not tell the two apart), and none elsewhere
        # under no_grad (its training forwards' router builds are new to it too: only where the
        # fused variant is new is their time asked of them)
        timed = [r["first_call_s"] < QUICK_S if compiled
                 else r["first_call_s"] >= SLOW_S if r["new_fused_variant"]
                 else r["training"] or r["first_call_s"] < QUICK_S for r in rows]
        ok = all(r["rel_err"] <= 1e-2 for r in rows) and all(timed)
        results.append({"compile_variants": compiled, "hidden_size": cfg.hidden_size, "compile_s": round(compile_s, 3),
                        "rows": rows, "ok": ok})
        print(json.dumps(results[-1]), flush=True)
        layer.backend.close()
    print(f"fused kernel variants compiled by compile_variants: {variants}", flush=True)
    ok = all(r["ok"] for r in results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "variants": variants,
                       "results": results, "ok": ok}, f, indent=1)
    fm.finalize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
