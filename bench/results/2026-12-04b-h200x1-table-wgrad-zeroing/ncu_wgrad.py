"""One-off: deepseek_v3 dw_in at 4,096 tokens (uniform), torch._grouped_mm then expert_wgrad, for ncu."""
import torch
from flashmoe_py import preset
from flashmoe_py.kernels.expert_wgrad import expert_wgrad
cfg = preset("deepseek_v3")
T, k, E, H, F2 = 4096, cfg.top_k, cfg.num_experts, cfg.hidden_size, 2 * cfg.ffn_size
g = torch.Generator().manual_seed(1)
counts = torch.bincount(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).flatten(), minlength=E)
S = int(counts.sum())
a = torch.randn(S, H, generator=g).cuda().bfloat16()
b = torch.randn(S, F2, generator=g).cuda().bfloat16()
offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
for _ in range(3):
    want = torch._grouped_mm(a.t(), b, offs=offs)
    got = expert_wgrad(a, b, offs)
torch.cuda.synchronize()
err = ((got.float() - want.float()).norm() / want.float().norm()).item()
print("rel", err, "S", S, "max/mean", (counts.max() / counts.float().mean()).item())
