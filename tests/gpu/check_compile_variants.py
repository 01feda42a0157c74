"""GPU, one process: FlashBackend.compile_variants leaves no fused kernel variant for a forward to
compile. A layer on several GPUs runs it when built, so that no rank compiles a variant (seconds,
bench/NOTES.md item 84) while its peers' kernels wait for it; at world 1 it is called here by hand.

With Triton's cache in a new, empty directory: one forward compiles the router and plan kernels
and the fused kernel's variant of few rows an expert; compile_variants then compiles the others
(the static GEMM1 order from 64 rows an expert, the tall tiles from 128); the first forwards at
those sizes must then take no compile's time (each under FIRST_CALL_S; a compile takes 3.5-5.4 s
on an H100's host) and match the float32 reference (bf16 bar 1e-2). The router and plan kernels
meet those sizes first (their variants follow the token count: compiled before the timing, so it
holds the fused kernel's alone). A layer of 64 experts, top-8 (variants of its own: the expert
count and top-k are the kernel's constants; the same rows an expert at each size), not asked to
compile them, shows what that time is: its first forwards at the same sizes, each of which must
take FIRST_CALL_S or more (else the check could not tell the two layers apart).

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
from flashmoe_py.backends.flash import routing_plan  # noqa: E402
from flashmoe_py.kernels.launch_config import launch_variants  # noqa: E402
from flashmoe_py.kernels.layout import heap_bytes_for  # noqa: E402

CONFIGS = {True: MoEConfig(hidden_size=1024, ffn_size=768, num_experts=32, top_k=4, dtype="bfloat16"),
           False: MoEConfig(hidden_size=1024, ffn_size=768, num_experts=64, top_k=8, dtype="bfloat16")}
MAX_TOKENS = 2048
FIRST = 16  # 2 rows an expert: few rows' variant, compiled by the first forward
SIZES = (512, 2048)  # 64 rows an expert: the static GEMM1 order; 256: tall tiles too
FIRST_CALL_S = 1.0


def first_forwards(layer: MoELayer, seed: int) -> list[dict]:
    """The first forward at each of SIZES (after one at FIRST): its seconds and error."""
    cfg, gen, backend = layer.config, torch.Generator().manual_seed(seed), layer.backend
    rows = []
    for tokens in SIZES:
        x = torch.randn(tokens, cfg.hidden_size, generator=gen).to("cuda", torch.bfloat16)
        routing_plan(layer.route(x), layer.expert_positions, backend.geo, backend.send_order,
                     torch.zeros_like(backend.ws.scratch.comb_expect))  # the router and plan kernels at this size
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = layer(x)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ref = reference_forward(x.float(), config=cfg, **layer.full_weight_dict())
        err = float((out.float() - ref).norm() / ref.norm())
        rows.append({"tokens": tokens, "first_call_s": round(seconds, 3), "rel_err": err})
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    fm.init(heap_bytes=sum(heap_bytes_for(cfg, 1, MAX_TOKENS, "p2p") for cfg in CONFIGS.values()))
    geo_variants = None
    results = []
    for compiled, cfg in CONFIGS.items():
        layer = MoELayer(cfg, max_tokens_per_rank=MAX_TOKENS, backend="flash", seed=1234 + compiled)
        with torch.no_grad():
            layer(torch.randn(FIRST, cfg.hidden_size, device="cuda", dtype=torch.bfloat16))
            start = time.perf_counter()
            if compiled:
                layer.backend.compile_variants()
                b = layer.backend
                geo_variants = launch_variants(b.geo, torch.bfloat16, b.programs, b.options.launch_override, b.resident)
            compile_s = time.perf_counter() - start
            rows = first_forwards(layer, seed=99 + compiled)
        quick = [r["first_call_s"] < FIRST_CALL_S for r in rows]
        # compiled ahead: no first forward compiles; the other layer's show the compile avoided (else
        # this check could not tell the two apart)
        ok = all(r["rel_err"] <= 1e-2 for r in rows) and (all(quick) if compiled else not any(quick))
        results.append({"compile_variants": compiled, "hidden_size": cfg.hidden_size, "compile_s": round(compile_s, 3),
                        "rows": rows, "ok": ok})
        print(json.dumps(results[-1]), flush=True)
        layer.backend.close()
    print(f"variants: {len(geo_variants)}", flush=True)
    ok = all(r["ok"] for r in results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "variants": len(geo_variants),
                       "results": results, "ok": ok}, f, indent=1)
    fm.finalize()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
