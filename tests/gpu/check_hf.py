"""GPU: tiny models of every family patch_model converts (fp32; from tests/test_hf.py, every
parameter re-drawn), patched with backend="flash", against the unpatched model on the same rank's
input, new ids each call; eager, replayed from the layer's CUDA graphs (each layer must have
one), under torch.compile (aot_eager: the graph capture is tested, not inductor's code; the
compiled graphs must call the layer's op, not fall back to eager), an unpatched model on rank 0's
CPU loaded (strict) with fm.hf_state_dict of the patched one, at world 1 the checkpoint the
patched model's save_pretrained writes with no state_dict (Trainer's call) read back by
from_pretrained (at world > 1 that call must raise ValueError), another model's checkpoint (the
Hub's layout its save_pretrained writes) loaded into the patched model by load_state_dict
(strict=False: Trainer's resume_from_checkpoint), and the model after unpatch_model.
Weights and inputs are drawn from a fresh seed each run (recorded); a family whose expert count
the world size does not divide gets a row saying so, and at least one family must be checked.
One process per GPU:

    bash launch/torchrun.sh tests/gpu/check_hf.py [--out results.json]"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grad_reference import rel_err  # noqa: E402  (NaN counts as inf)
from test_hf import MODELS, compiled_and_ops, moe_block, tiny_model  # noqa: E402

import flashmoe_py as fm  # noqa: E402
from flashmoe_py.hf import block_config  # noqa: E402
from flashmoe_py.hf import patch_model, unpatch_model  # noqa: E402
from flashmoe_py.runtime import detect_launcher  # noqa: E402

TOKENS = (2, 64)  # batch, seq per rank


def model_on_gpu(kind: str, seed: int):
    return tiny_model(kind, seed).to("cuda", torch.float32)  # fp32: HF and flashmoe_py route alike


def default_save_error(model, kind: str, world: int, ids, want) -> float:
    """save_pretrained with no state_dict, as Trainer's checkpoints call it: at world 1 the
    unpatched model's checkpoint, read back by from_pretrained on the CPU -> its logits' error;
    at world > 1 refused with ValueError -> 0.0 (inf where it is not)."""
    with tempfile.TemporaryDirectory() as path:
        try:
            model.save_pretrained(path)
        except ValueError:
            return 0.0 if world > 1 else float("inf")
        if world > 1:
            return float("inf")
        loaded = getattr(transformers, MODELS[kind]).from_pretrained(path).eval()
        return rel_err(loaded(ids.cpu()).logits, want.cpu())


def another_checkpoint(model, kind: str, seed: int, ids) -> torch.Tensor:
    """Another model's checkpoint as its save_pretrained writes it (the Hub's layout), loaded into
    the patched `model` as Trainer's resume_from_checkpoint does (load_state_dict(strict=False) of
    the file, on every rank) -> that other model's logits on ids."""
    from safetensors.torch import load_file
    other = model_on_gpu(kind, seed).eval()
    with tempfile.TemporaryDirectory() as path:
        other.save_pretrained(path)
        state = load_file(os.path.join(path, "model.safetensors"))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{kind}: loading another model's checkpoint left {result}")
    return other(ids).logits.float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    world = detect_launcher().world_size
    max_tokens = TOKENS[0] * TOKENS[1]
    configs = {k: block_config(moe_block(tiny_model(k, 0))) for k in MODELS}  # shapes only
    kinds = [k for k in MODELS if configs[k].num_experts % world == 0]
    rt = fm.init(layers=[(configs[k], max_tokens) for k in kinds for _ in range(2)])
    seed = torch.tensor([random.SystemRandom().randrange(2**31)], device="cuda")
    torch.distributed.broadcast(seed, 0)  # the same weights on every rank
    seed = int(seed)
    rows = [{"model": k, "world": world, "seed": seed, "ok": None,
             "skipped": f"{configs[k].num_experts} experts do not divide over {world} ranks"}
            for k in MODELS if k not in kinds]
    for kind in kinds:
        model = model_on_gpu(kind, seed)
        vocab = model.config.vocab_size
        gen = torch.Generator("cuda").manual_seed(seed + 1 + rt.rank)
        # new ids each call: an output left unwritten cannot pass on a block the allocator hands back
        ids_list = [torch.randint(0, vocab, TOKENS, device="cuda", generator=gen) for _ in range(4)]
        with torch.no_grad():
            wants = [model(ids).logits.float() for ids in ids_list]
            ids, want = ids_list[0], wants[0]
            report = patch_model(model, backend="flash", max_tokens_per_rank=max_tokens)
            errs = []
            for ids_i, want_i in zip(ids_list[:3], wants):  # eager, then a captured CUDA graph replayed
                errs.append(rel_err(model(ids_i).logits, want_i))
            graphs = min((len(m.backend.graphs) for m in model.modules() if isinstance(m, fm.MoELayer)), default=0)
            compiled, ops = compiled_and_ops(model)
            errs.append(rel_err(compiled(ids_list[3]).logits, wants[3]))
            graphs_and_op = "flashmoe.moe_forward" in ops and graphs > 0  # not dynamo's eager fallback; graphs made
            state = fm.hf_state_dict(model)  # rank 0's CPU: an unpatched model loads it
            if rt.rank == 0:
                fresh = tiny_model(kind, seed + 1)
                fresh.load_state_dict(state)
                errs.append(rel_err(fresh(ids.cpu()).logits, want.cpu()))
            elif state:
                errs.append(float("inf"))  # only rank 0 is given it
            errs.append(default_save_error(model, kind, world, ids, want))
            other_want = another_checkpoint(model, kind, seed + 2, ids)  # now the model's weights
            errs.append(rel_err(model(ids).logits, other_want))
            unpatch_model(model)  # the transformers blocks back, on the GPU
            errs.append(rel_err(model(ids).logits, other_want))
        err = torch.tensor([max(errs)], device="cuda")
        torch.distributed.all_reduce(err, op=torch.distributed.ReduceOp.MAX)
        replaced = sum(v == "replaced" for v in report.values())
        everywhere = torch.tensor([float(graphs_and_op)], device="cuda")
        torch.distributed.all_reduce(everywhere, op=torch.distributed.ReduceOp.MIN)
        graphs_and_op = bool(everywhere.item())  # every rank: each layer replayed a graph, the compiled model its op
        row = {"model": kind, "world": world, "seed": seed, "replaced": replaced, "rel_err_logits": float(err),
               "graphs_and_op": graphs_and_op,  # (nothing replaced: the model against itself)
               "ok": float(err) <= 1e-4 and replaced == 2 and graphs_and_op}
        rows.append(row)
        if rt.rank == 0:
            print(json.dumps(row), flush=True)
    if rt.rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "commit": os.environ.get("FLASHMOE_COMMIT", "unknown"), "world": world, "rows": rows},
                      f, indent=1)
    fm.finalize()
    checked = [r for r in rows if r["ok"] is not None]
    sys.exit(0 if checked and all(r["ok"] for r in checked) else 1)


if __name__ == "__main__":
    main()
