"""Host time a call (perf_counter, no synchronisation inside the loop) of expert_dgrad's pieces and of
the routed experts' backward at qwen3_30b_a3b's sizes, 4,096 tokens; GPU time by CUDA events."""
import json, os, sys, time
import torch
import flashmoe_py as fm
from flashmoe_py.kernels import expert_dgrad as kd
from flashmoe_py.backends import expert_grad as eg

def host_us(fn, n=200):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter(); e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record(); h = (time.perf_counter() - t0) * 1e6 / n
    e1.synchronize()
    return round(h, 1), round(e0.elapsed_time(e1) * 1e3 / n, 1)

rows = []
for name, T in (("qwen3_30b_a3b", 4096), ("deepseek_v3", 4096)):
    cfg = fm.preset(name); H, F, E, k = cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k
    S = T * k; g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.bincount(torch.randint(0, E, (S,), device="cuda", generator=g), minlength=E)
    ends = counts.cumsum(0).to(torch.int32)
    dy = torch.randn(S, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w_out = torch.randn(E, F, H, device="cuda", dtype=torch.bfloat16, generator=g)
    res = {"preset": name, "tokens": T}
    res["row_tiles_wide"] = host_us(lambda: kd.RowTiles.of(ends, S, 128, True))
    res["row_tiles_plain"] = host_us(lambda: kd.RowTiles.of(ends, S, 128, False))
    tiles = kd.RowTiles.of(ends, S, 128, True)
    res["dgrad_g_call"] = host_us(lambda: kd.expert_dgrad(dy, w_out, ends, tiles))
    res["grouped_g_call"] = host_us(lambda: torch._grouped_mm(dy, w_out.transpose(1, 2), offs=ends))
    res["suits"] = host_us(lambda: kd.suits(dy, w_out, E))
    x = torch.randn(S, H, device="cuda", dtype=torch.bfloat16, generator=g)
    w_in = torch.randn(E, H, 2 * F, device="cuda", dtype=torch.bfloat16, generator=g)
    pre = torch.randn(S, 2 * F, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = torch.rand(S, device="cuda", generator=g)
    for mmr in (128, 256):
        kd.MAX_MEAN_ROWS = mmr
        res[f"expert_ffn_backward_max{mmr}"] = host_us(
            lambda: eg.expert_ffn_backward(x, dy, scale, counts, {"w_in": w_in, "w_out": w_out}, cfg, pre), n=30)
    kd.MAX_MEAN_ROWS = 128
    print(json.dumps(res), flush=True); rows.append(res)
    del dy, w_out, x, w_in, pre; torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(), "commit": os.environ.get("FLASHMOE_COMMIT"), "rows": rows},
          open(os.path.join(os.environ["OUT"], "host_probe.json"), "w"), indent=1)
