"""The spread of each gradient's error over 40 seeds (bf16; sigmoid_grouped routing with a router bias, weight
on input and without, a gated shared expert; 96 tokens): backend flash (backward saved, launched) and backend torch
(saved) on one GPU. Ran as `torchrun --nproc-per-node 1 router_bias_spread.py` from the repository root."""
import json, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from grad_reference import grad_errors
import flashmoe_py as fm
from flashmoe_py.kernels.layout import heap_bytes_for
N = int(os.environ.get("RB_N", "40"))
rows = {}
for woi in (True, False):
    cfg = fm.MoEConfig(hidden_size=64, ffn_size=96, num_experts=16, dtype="bfloat16", top_k=2, routing="sigmoid_grouped",
                       n_group=4, topk_group=2, router_bias=True, weight_on_input=woi, shared_experts=1,
                       shared_expert_gate=True)
    if woi:
        fm.init(heap_bytes=heap_bytes_for(cfg, 1, 96, "p2p"))
    for backend in ("flash", "torch"):
        errs = {}
        t0 = time.time()
        for seed in range(N):
            kw = dict(max_tokens_per_rank=96, cuda_graphs=False) if backend == "flash" else {}
            layer = fm.MoELayer(cfg, backend=backend, backward="saved", seed=seed, **kw)
            g = torch.Generator().manual_seed(seed + 1000)
            x = torch.randn(96, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
            dy = torch.randn(96, 64, generator=g).to("cuda", torch.bfloat16)
            for n, e in grad_errors(layer, x, dy).items():
                if e is not None:
                    errs.setdefault(n, []).append(e)
            if backend == "flash":
                layer.backend.close()
        key = f"woi={woi} {backend}"
        rows[key] = {n: sorted(es) for n, es in errs.items()}
        for n, es in rows[key].items():
            print(key, n, "median %.2e p90 %.2e max %.2e over %d" % (es[len(es)//2], es[int(len(es)*.9)], es[-1],
                  sum(e > 1e-2 for e in es)), flush=True)
        print(key, "seconds", round(time.time() - t0, 1), flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "rb_probe.json"), "w"))
fm.finalize()
