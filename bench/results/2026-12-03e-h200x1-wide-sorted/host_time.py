"""fwd+bwd on one GPU: per-step host enqueue time against CUDA-event step time, the saving forward
eager (default GRAPHED_SAVE_BYTES) and replayed from a CUDA graph (limit raised), rounds alternated."""
import json, statistics, sys, time
import torch
sys.path.insert(0, "bench")
import flashmoe_py as fm
from flashmoe_py.backends.flash import FlashBackend
from flashmoe_py.kernels.layout import heap_bytes_for
from layer import training_step

presets = sys.argv[1].split(",")
T = int(sys.argv[2])
rt = fm.init(heap_bytes=max(heap_bytes_for(fm.preset(p), 1, T) for p in presets))
default = FlashBackend.GRAPHED_SAVE_BYTES
rows = []
for p in presets:
    cfg = fm.preset(p)
    layer = fm.MoELayer(cfg, backend="flash", max_tokens_per_rank=T, seed=17, backward="saved")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(T, cfg.hidden_size, generator=gen).to(rt.device, cfg.torch_dtype).requires_grad_(True) for _ in range(2)]
    dys = [torch.randn(T, cfg.hidden_size, generator=gen).to(rt.device, cfg.torch_dtype) for _ in range(2)]
    for rnd in range(3):
        for name, limit in (("eager", default), ("graph", 1 << 40)) if rnd % 2 == 0 else (("graph", 1 << 40), ("eager", default)):
            FlashBackend.GRAPHED_SAVE_BYTES = limit
            host, gpu = [], []
            for x, dy in zip(xs, dys):
                step = training_step(layer, x, dy)
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
                for a, b in ev:
                    t0 = time.perf_counter(); a.record(); step(); b.record(); host.append((time.perf_counter() - t0) * 1e6)
                torch.cuda.synchronize()
                gpu += [a.elapsed_time(b) * 1e3 for a, b in ev]
            row = {"preset": p, "tokens": T, "round": rnd, "forward": name, "step_us": statistics.median(gpu),
                   "host_us": statistics.median(host), "step_min_us": min(gpu), "device": torch.cuda.get_device_name(),
                   "commit": "9447372", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            rows.append(row); print(json.dumps(row), flush=True)
    layer.backend.close()
json.dump(rows, open(sys.argv[3], "w"), indent=1)
fm.finalize()
