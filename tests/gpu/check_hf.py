"""GPU: tiny models of every family patch_model converts (fp32; from tests/test_hf.py, every
parameter re-drawn), patched with backend="flash", against the unpatched model on the same rank's
input; eager, replayed from the layer's CUDA graphs, and under torch.compile (aot_eager: the graph
capture is tested, not inductor's code). One process per GPU:

    bash launch/torchrun.sh tests/gpu/check_hf.py [--out results.json]"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_hf import MODELS, moe_block, tiny_model  # noqa: E402

import flashmoe_py as fm  # noqa: E402
from flashmoe_py.hf import block_config  # noqa: E402
from flashmoe_py.hf import patch_model  # noqa: E402
from flashmoe_py.runtime import detect_launcher  # noqa: E402

TOKENS = (2, 64)  # batch, seq per rank
SEED = 1234


def model_on_gpu(kind: str):
    return tiny_model(kind, SEED).to("cuda", torch.float32)  # fp32: HF and flashmoe_py route alike


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    world = detect_launcher().world_size
    max_tokens = TOKENS[0] * TOKENS[1]
    kinds = [k for k in MODELS if block_config(moe_block(tiny_model(k, SEED))).num_experts % world == 0]
    layers = [(block_config(moe_block(tiny_model(k, SEED))), max_tokens) for k in kinds for _ in range(2)]
    rt = fm.init(layers=layers)
    rows = []
    for kind in kinds:
        model = model_on_gpu(kind)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, TOKENS, device="cuda", generator=torch.Generator("cuda").manual_seed(rt.rank))
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
