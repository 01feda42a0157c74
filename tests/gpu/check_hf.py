"""GPU: tiny Mixtral and Qwen3-MoE models (fp32), patched with backend="flash", against the
unpatched model on the same rank's input; eager, replayed from the layer's CUDA graphs, and under
torch.compile (aot_eager: the graph capture is tested, not inductor's code). One process per GPU:

    bash launch/torchrun.sh tests/gpu/check_hf.py [--out results.json]"""

import argparse
import json
import sys

import torch
import transformers

import flashmoe_py as fm
from flashmoe_py.hf import block_config, patch_model
from flashmoe_py.runtime import detect_launcher

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
TOKENS = (2, 64)  # batch, seq per rank


def tiny_model(kind: str, world: int):
    torch.manual_seed(1234)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**TINY, num_local_experts=2 * world, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=128, num_experts=8 * world,
                                          num_experts_per_tok=4, norm_topk_prob=True, head_dim=64)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    return model.to("cuda", torch.float32).eval()  # fp32: HF and flashmoe_py route identically


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    world = detect_launcher().world_size
    max_tokens = TOKENS[0] * TOKENS[1]
    layers = [(block_config(tiny_model(k, world).model.layers[0].mlp), max_tokens)
              for k in ("mixtral", "qwen3_moe") for _ in range(2)]
    rt = fm.init(layers=layers)
    rows = []
    for kind in ("mixtral", "qwen3_moe"):
        model = tiny_model(kind, world)
        ids = torch.randint(0, 1000, TOKENS, device="cuda", generator=torch.Generator("cuda").manual_seed(rt.rank))
        with torch.no_grad():
            want = model(ids).logits.float()
            report = patch_model(model, backend="flash", max_tokens_per_rank=max_tokens)
            errs = []
            for _ in range(3):  # eager, then a captured CUDA graph replayed
                errs.append(float((model(ids).logits.float() - want).norm() / want.norm()))
            compiled = torch.compile(model, backend="aot_eager")
            errs.append(float((compiled(ids).logits.float() - want).norm() / want.norm()))
        err = torch.tensor([max(errs)], device="cuda")
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
        row = {"model": kind, "world": world, "replaced": sum(v == "replaced" for v in report.values()),
               "rel_err_logits": float(err), "ok": float(err) <= 1e-4}
        rows.append(row)
        if rt.rank == 0:
            print(json.dumps(row), flush=True)
    if rt.rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "world": world, "rows": rows}, f, indent=1)
    fm.finalize()
    sys.exit(0 if all(r["ok"] and r["replaced"] == 2 for r in rows) else 1)


if __name__ == "__main__":
    main()
