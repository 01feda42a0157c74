import torch
import torch._inductor.config as ic
import flashmoe_py as fm
ic.fx_graph_cache = False
for dev in ("cpu", "cuda"):
    cfg = fm.MoEConfig(hidden_size=64, ffn_size=64, num_experts=8, top_k=2, dtype="bfloat16" if dev == "cuda" else "float32")
    for grad in (False, True):
        torch._dynamo.reset()
        layer = fm.MoELayer(cfg, seed=1, device=dev)
        ran = []
        orig = layer.backend.forward
        layer.backend.forward = lambda x, *a, **k: ran.append(x.shape[0]) or orig(x, *a, **k)
        c = torch.compile(lambda h: h + 2 * layer(h), fullgraph=True)
        with torch.set_grad_enabled(grad):
            c(torch.randn(6, 64, device=dev, dtype=cfg.torch_dtype, requires_grad=grad))
            c(torch.randn(0, 64, device=dev, dtype=cfg.torch_dtype, requires_grad=grad))
        print(dev, "grad", grad, "token counts run:", ran, "want [6, 0]")
