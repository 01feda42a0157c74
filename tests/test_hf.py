"""Hugging Face MoE blocks swapped for MoELayer: same outputs, on 1 and 2 ranks, for every family
hf.py converts; the same routing as HF's own routers; router logits for transformers' loss; what
is left alone is reported with its reason; torch.compile."""

import copy
import functools
import io
import json
import random

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402  (transformers' dependency)
from transformers.trainer_utils import load_sharded_checkpoint  # noqa: E402

import flashmoe_py.hf as hf_module  # noqa: E402
from flashmoe_py import hub_layout  # noqa: E402
from flashmoe_py import ConsistencyError, DataParallelError, ExpertPlacement, MoELayer, prepare_fsdp  # noqa: E402
from flashmoe_py.hf import (HFMoEBlock, block_config, convert_block, from_hf_block, hf_state_dict, patch_model,  # noqa: E402
                             unpatch_model)
from flashmoe_py.routing import route  # noqa: E402
from grad_reference import rel_err  # noqa: E402
from seeds import fresh_seed  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_config(kind: str):
    """A two-layer model of `kind`, every layer's MLP an MoE block, with routing options that matter."""
    if kind == "mixtral":
        return transformers.MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=3,
                                           norm_topk_prob=True, head_dim=8)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**TINY, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                           shared_expert_intermediate_size=40, norm_topk_prob=False)
    if kind == "olmoe":
        return transformers.OlmoeConfig(**TINY, num_experts=8, num_experts_per_tok=2)
    if kind == "deepseek_v3":
        return transformers.DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, **MLA, moe_intermediate_size=16,
                                             n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                             routed_scaling_factor=2.5, n_shared_experts=2, first_k_dense_replace=0)
    if kind == "glm4_moe":
        return transformers.Glm4MoeConfig(**TINY, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                                          n_group=2, topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=False,
                                          first_k_dense_replace=0, head_dim=8)
    if kind == "llama4":
        return transformers.Llama4TextConfig(**TINY, intermediate_size_mlp=40, num_local_experts=4,
                                             num_experts_per_tok=2, head_dim=8)
    if kind == "gpt_oss":  # a small limit, so that the clamps of its SwiGLU are hit
        return transformers.GptOssConfig(**TINY, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                         swiglu_limit=0.5)
    assert kind == "qwen3_next"
    return transformers.Qwen3NextConfig(**TINY, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                        num_experts=8, num_experts_per_tok=2, head_dim=8, linear_key_head_dim=8,
                                        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                                        layer_types=["linear_attention", "full_attention"])


MODELS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
          "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
          "llama4": "Llama4ForCausalLM", "gpt_oss": "GptOssForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}


def tiny_model(kind: str, seed: int):
    """A tiny model of `kind`, its weights drawn from `seed` (the global generator left as it was:
    later tests' unseeded draws stay fresh)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, MODELS[kind])(tiny_config(kind))
        for p in model.parameters():  # HF leaves some weights at zero; make every path matter
            p.data.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model.eval()


def moe_block(model):
    layer = model.model.layers[0]
    return layer.feed_forward if hasattr(layer, "feed_forward") else layer.mlp


def compiled_and_ops(model):
    """-> (torch.compile(model) with aot_eager, the set of ops its compiled graphs call, filled as
    it compiles). Dynamo is reset first: transformers' forward wrapper is one code object for
    every family, so the graphs of earlier models count toward dynamo's recompile limit, past
    which it runs the model eagerly with only a warning (a ninth family did, on a GPU), and a
    compiled check would test nothing compiled. Assert the layer's op is among the ops."""
    torch._dynamo.reset()
    ops: set[str] = set()
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)
    return torch.compile(model, backend=backend), ops


def patched_vs_original(rank, world, kind, seed):
    model = tiny_model(kind, seed)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed + rank))
    with torch.no_grad():
        want = model(ids).logits
        report = patch_model(model)
        got = model(ids).logits
    replaced = sum(v == "replaced" for v in report.values())
    return replaced, float((got - want).norm() / want.norm())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_patched_model_matches_original(dist_pools, world, kind):
    seed = random.SystemRandom().randrange(2**20)
    for replaced, err in dist_pools(world).run(patched_vs_original, kind, seed):
        assert replaced == 2  # one MoE block per decoder layer
        assert err <= 1e-5


def dense(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] weights of [T, k] experts -> [T, E], zero where not picked (order-free)."""
    return torch.zeros(weights.shape[0], num_experts, dtype=weights.dtype).scatter_(1, experts, weights)


@pytest.mark.parametrize("kind", list(MODELS))
def test_route_matches_hf_router(kind):
    """routing.route on the converted config and weights picks HF's experts with HF's weights."""
    block = moe_block(tiny_model(kind, random.SystemRandom().randrange(2**20)))
    conv = convert_block(block)
    x = torch.randn(64, conv.config.hidden_size)
    w = conv.weights
    r = route(x, w["router_weight"], conv.config, router_bias=w.get("router_bias"),
              e_score_correction_bias=w.get("e_score_correction_bias"))
    E = conv.config.num_experts
    with torch.no_grad():
        if kind == "llama4":  # (scores [T, E], logits): sigmoid, 0 where not picked
            want = conv.router(x)[0]
        else:  # (logits, weights [T, k], experts [T, k])
            _, hf_weights, hf_experts = conv.router(x)
            want = dense(hf_weights, hf_experts, E)
    torch.testing.assert_close(dense(r.weights, r.experts, E), want.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(MODELS))
def test_router_logits_are_recorded_for_transformers(kind):
    """output_router_logits=True on a patched model (patched before its first call): the router
    logits HF records, and the load-balancing loss of the models that compute one."""
    seed = random.SystemRandom().randrange(2**20)
    original, patched = tiny_model(kind, seed), tiny_model(kind, seed)
    assert set(patch_model(patched).values()) == {"replaced"}
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want, got = (m(ids, output_router_logits=True) for m in (original, patched))
    assert len(got.router_logits) == len(want.router_logits) == 2
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    if want.aux_loss is not None:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", [k for k in MODELS if k not in ("llama4", "gpt_oss")])
def test_router_runs_only_while_a_hook_sees_it(kind):
    """transformers leaves its recorder on the router after an output_router_logits=True call: the
    block's router runs again only in such calls, or for a hook of the user's."""
    patched = tiny_model(kind, random.SystemRandom().randrange(2**20))
    patch_model(patched)
    routers = [m.router for m in patched.modules() if isinstance(m, HFMoEBlock)]
    calls = []
    for router in routers:
        router.forward = functools.partial(lambda f, *a: calls.append(1) or f(*a), router.forward)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        for kwargs, runs in [({}, 0), ({"output_router_logits": True}, 1), ({}, 0),
                             ({"output_hidden_states": True}, 0), ({"output_router_logits": True}, 1)]:
            calls.clear()
            out = patched(ids, **kwargs)
            assert len(calls) == runs * len(routers), kwargs
            assert (getattr(out, "router_logits", None) is not None) == bool(runs), kwargs
        seen = []
        routers[0].register_forward_hook(lambda m, args, output: seen.append(output))
        calls.clear()
        patched(ids)
    assert len(calls) == 1 and len(seen) == 1


def test_a_compiled_patched_model_records_router_logits():
    """torch.compile of a patched model, with and without output_router_logits=True, after an eager
    call left transformers' recorder on the routers: HF's outputs either way."""
    seed = random.SystemRandom().randrange(2**20)
    original, patched = tiny_model("qwen3_moe", seed), tiny_model("qwen3_moe", seed)
    patch_model(patched)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        patched(ids, output_router_logits=True)
        compiled, ops = compiled_and_ops(patched)
        for record in (False, True):
            got, want = compiled(ids, output_router_logits=record), original(ids, output_router_logits=record)
            assert "flashmoe.moe_forward" in ops  # the layer compiled as its op, not run eagerly
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
            assert (got.router_logits is None) == (not record)
            for g, w in zip(got.router_logits or (), want.router_logits or (), strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama4", "gpt_oss"])
def test_blocks_that_return_router_output_still_do(kind):
    """Llama-4: (hidden [tokens, H], router logits); gpt-oss: (hidden [batch, seq, H], weights)."""
    block = moe_block(tiny_model(kind, 3))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = block(x)
        got = from_hf_block(block)(x)
    assert isinstance(got, tuple) and [t.shape for t in got] == [t.shape for t in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_block_adapter_keeps_only_this_ranks_experts():
    model = tiny_model("mixtral", 0)
    block = model.model.layers[0].mlp
    cfg = block_config(block)
    assert (cfg.num_experts, cfg.top_k, cfg.ffn_size, cfg.renormalize) == (8, 2, 48, True)
    new = from_hf_block(block)
    assert isinstance(new, HFMoEBlock) and new.moe.w_in.shape == (8, 32, 96)
    torch.testing.assert_close(new.moe.w_out[3], block.experts.down_proj[3].t())
    assert new.router.weight is new.moe.router_weight  # one router, one set of gradients


@pytest.mark.parametrize("kind,fields", [
    ("deepseek_v3", dict(routing="sigmoid_grouped", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         renormalize=True, shared_experts=2, shared_ffn_size=None, top_k=3)),
    ("glm4_moe", dict(routing="sigmoid_grouped", n_group=2, topk_group=1, routed_scaling_factor=1.5,
                      renormalize=False, shared_experts=1)),
    ("llama4", dict(routing="topk_sigmoid", weight_on_input=True, renormalize=False, shared_experts=1,
                    shared_ffn_size=48, ffn_size=48)),
    ("gpt_oss", dict(routing="topk_softmax", router_bias=True, expert_bias=True, activation="clamped_swiglu",
                     swiglu_alpha=1.702, swiglu_limit=0.5)),
    ("qwen3_next", dict(shared_experts=1, shared_ffn_size=40, shared_expert_gate=True, ffn_size=24)),
])
def test_block_config_reads_the_models_routing(kind, fields):
    cfg = block_config(moe_block(tiny_model(kind, 0)))
    assert {f: getattr(cfg, f) for f in fields} == fields


def test_float32_router_of_a_bf16_deepseek_is_kept():
    """transformers keeps DeepSeek-V3's router weight and correction bias in float32."""
    model = tiny_model("deepseek_v3", 0).to(torch.bfloat16)
    block = moe_block(model)
    block.gate.float()
    cfg = block_config(block)
    assert (cfg.dtype, cfg.router_dtype) == ("bfloat16", "float32")


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_deepseek_without_shared_experts_converts_exactly():
    """n_shared_experts=0 (transformers builds a shared MLP of width 0): a layer with no shared experts."""
    cfg = transformers.DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, **MLA, moe_intermediate_size=16,
                                        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                        n_shared_experts=0, first_k_dense_replace=0)
    with torch.random.fork_rng():  # fresh weights and ids, the global generator left as it was
        torch.manual_seed(fresh_seed())
        model = transformers.DeepseekV3ForCausalLM(cfg).eval()
        for p in model.parameters():
            p.data.normal_(0, 0.2)
        ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        assert set(patch_model(model).values()) == {"replaced"}
        got = model(ids).logits
    assert moe_block(model).moe.config.shared_experts == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_block_on_the_meta_device_is_reported_and_left_alone():
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(tiny_config("mixtral"))
    report = patch_model(model)
    assert report["model.layers.0.mlp"] == ("MixtralSparseMoeBlock: its weights are on the meta device (not "
                                            "loaded yet); materialise them before converting the block")
    assert not isinstance(moe_block(model), HFMoEBlock)


class Odd(nn.Module):
    """An MoE-looking block no adapter knows."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_blocks_left_alone_are_reported_with_their_reason():
    model = tiny_model("mixtral", 0)
    model.model.layers[1].mlp.jitter_noise = 0.1
    model.model.extra = Odd()
    report = patch_model(model)
    assert report["model.layers.0.mlp"] == "replaced"
    assert report["model.layers.1.mlp"] == ("MixtralSparseMoeBlock: router_jitter_noise=0.1 (training-time "
                                            "input noise) is not implemented")
    assert report["model.extra"].startswith("Odd: no adapter for this block; flashmoe_py converts "
                                            "MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock")


class MixtralSparseMoeBlock(nn.Module):
    """transformers 4.x's layout of a block whose name an adapter knows: nn.ModuleList experts."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2, bias=False)
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


class DeepseekV3MoE(nn.Module):
    """A block of a known name whose experts lack what its adapter reads."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2, bias=False)
        self.experts = nn.Linear(4, 4)


def test_a_known_block_name_in_another_layout_is_reported_not_raised():
    """Adapters are found by class name: a remote-code or transformers 4.x block of that name
    raised AttributeError out of patch_model instead of being reported."""
    model = nn.Sequential()
    model.add_module("old", MixtralSparseMoeBlock())
    model.add_module("other", DeepseekV3MoE())
    report = patch_model(model)
    assert report["old"].startswith("MixtralSparseMoeBlock: its experts are an nn.ModuleList of per-expert MLPs")
    assert report["other"].startswith("DeepseekV3MoE: not transformers 5's layout of it (")
    assert isinstance(model.old, MixtralSparseMoeBlock) and isinstance(model.other, DeepseekV3MoE)


def test_compiled_layer_has_no_graph_break():
    layer = MoELayer(block_config(tiny_model("olmoe", 1).model.layers[0].mlp).replace(), seed=3)
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("kind", MODELS)
def test_every_family_is_one_the_fused_backend_takes(kind):
    """Nothing of any converted family is refused by backend 'flash' for what it is: on this CPU
    the only reason left is the missing GPU (tests/gpu/check_hf.py runs them there)."""
    cfg = block_config(moe_block(tiny_model(kind, 0)))
    with pytest.raises(ValueError, match="backend='flash' is unavailable: no CUDA device"):
        MoELayer(cfg, backend="flash", max_tokens_per_rank=64)


def patched_with_one_rank_s_block_refused(rank, world, seed):
    """Rank 1 has block 1 left alone (jitter noise), rank 0 converts it -> what patch_model raised."""
    model = tiny_model("mixtral", seed)
    if rank == 1:
        model.model.layers[1].mlp.jitter_noise = 0.1
    try:
        patch_model(model)
    except ConsistencyError as e:
        return str(e)
    return None


def test_ranks_that_decide_a_block_differently_all_raise_before_building_any_layer(dist_pools):
    """Building a layer is collective: a rank leaving a block alone (weights not loaded there, say)
    beside one converting it must not leave the other waiting. Every rank names the block."""
    errors = dist_pools(2).run(patched_with_one_rank_s_block_refused, fresh_seed())
    assert all(e is not None and "disagree on block 'model.layers.1.mlp'" in e for e in errors), errors
    assert "rank 1 leaves it: MixtralSparseMoeBlock: router_jitter_noise=0.1" in errors[0]


def test_a_second_patch_model_is_refused_until_the_model_is_unpatched():
    """A second call used to return {} and keep the first call's layers, its arguments (another
    backend, say) silently ignored."""
    model = tiny_model("mixtral", fresh_seed())
    patch_model(model)
    layers = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    with pytest.raises(ValueError, match=r"already patched \(2 HFMoEBlock\(s\), the first at 'model\.layers\.0\.mlp'\)"
                       r".*unpatch_model\(model\) first"):
        patch_model(model, backend="torch")
    assert [m for m in model.modules() if isinstance(m, HFMoEBlock)] == layers
    unpatch_model(model)
    assert patch_model(model, backend="torch") == {f"model.layers.{i}.mlp": "replaced" for i in range(2)}


def patched_on_one_rank_only(rank, world, seed):
    """Rank 0's model was patched before, rank 1's not -> what a second patch_model raised."""
    model = tiny_model("mixtral", seed)
    alone = [torch.distributed.new_group([r]) for r in range(world)]  # collective: every rank makes both
    if rank == 0:
        patch_model(model, process_group=alone[0])
    try:
        patch_model(model)
    except (ConsistencyError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def test_a_model_patched_on_some_ranks_only_raises_on_every_rank(dist_pools):
    errors = dist_pools(2).run(patched_on_one_rank_only, fresh_seed())
    assert all(e is not None and e.startswith("ConsistencyError: patch_model: the ranks disagree on block "
                                              "'model.layers.0.mlp'") for e in errors), errors


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_frozen_parameters_stay_frozen_and_trainable_ones_train(kind):
    """A user who froze the router, the experts or the shared experts (the base weights under LoRA,
    say) keeps them frozen; a group frozen in part is refused, naming it."""
    for frozen in ("router", "experts", "shared"):
        model = tiny_model(kind, 1)
        block = moe_block(model)
        router = block.gate
        experts = set(block.experts.parameters())
        group = {"router": set(router.parameters()), "experts": experts,
                 "shared": {p for p in block.parameters() if p not in experts and p not in set(router.parameters())}}
        if not group[frozen]:
            continue  # mixtral has no shared experts
        for p in group[frozen]:
            p.requires_grad_(False)
        assert patch_model(model)["model.layers.0.mlp"] == "replaced"
        trains = {n: p.requires_grad for n, p in moe_block(model).moe.named_parameters()}
        owner = {n: "router" if n.startswith("router_") else "shared" if n.startswith("shared_") else "experts"
                 for n in trains}
        assert trains == {n: owner[n] != frozen for n in trains}, (frozen, trains)
        unpatch_model(model)  # and back: still frozen where it was, nothing left for DDP to skip
        block = moe_block(model)
        experts = set(block.experts.parameters())
        router = set(block.gate.parameters())
        back = {"router": router, "experts": experts,
                "shared": {p for p in block.parameters() if p not in experts and p not in router}}
        assert all(p.requires_grad == (g != frozen) for g, ps in back.items() for p in ps), frozen
        assert model._ddp_params_and_buffers_to_ignore == []
    model = tiny_model(kind, 1)
    next(iter(moe_block(model).experts.parameters())).requires_grad_(False)
    assert "its experts parameters are partly frozen" in patch_model(model)["model.layers.0.mlp"]


def gradients_with_checkpointing(rank, world, kind, backward, seed, router_logits=False,
                                 modes=("non_reentrant", "reentrant")):
    """One training step of a patched model without activation checkpointing, then with
    transformers' (torch's non-reentrant and reentrant: the layers' forwards rerun in backward,
    collectives and all), with router_logits the router's load-balancing loss in it -> {mode:
    the largest error of a gradient against the first step's, or the names whose gradient one
    step had and the other not}."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed + rank))
    grads = {}
    for mode in ("off", *modes):
        model = tiny_model(kind, seed)
        patch_model(model, backward=backward)
        model.train()
        if mode != "off":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        model(ids, labels=ids, **({"output_router_logits": True} if router_logits else {})).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = grads.pop("off")
    return {mode: (max(rel_err(g[n], w) for n, w in want.items()) if g.keys() == want.keys()
                   else sorted(g.keys() ^ want.keys())) for mode, g in grads.items()}


@pytest.mark.parametrize("backward", ["autograd", "saved", "recompute"])
def test_activation_checkpointing_gives_the_same_gradients(dist_pools, backward):
    for errs in dist_pools(2).run(gradients_with_checkpointing, "deepseek_v3", backward, fresh_seed()):
        assert all(isinstance(e, float) and e <= 1e-6 for e in errs.values()), errs


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_activation_checkpointing_with_the_router_loss(dist_pools, kind):
    """output_router_logits=True: the router module ran in the forward (transformers collects its
    logits during the model call) but not in the checkpoint's recomputation (outside that call),
    and torch refused the backward (a different number of tensors saved). Non-reentrant only:
    under reentrant checkpointing transformers' own model loses the loss's gradient through the
    router logits (0.063 off its step without checkpointing)."""
    for errs in dist_pools(2).run(gradients_with_checkpointing, kind, "saved", fresh_seed(), True,
                                  ("non_reentrant",)):
        assert all(isinstance(e, float) and e <= 1e-6 for e in errs.values()), errs


def test_a_patched_model_s_experts_are_left_out_of_ddp():
    """DistributedDataParallel would copy rank 0's experts to every rank: patch_model names each
    layer's sharded parameters and buffers for DDP to leave alone, under torch.compile's
    "_orig_mod." too (DDP(torch.compile(model)) names them so)."""
    model = tiny_model("qwen3_moe", 2)
    patch_model(model)
    names = [f"model.layers.{i}.mlp.moe.{n}" for i in (0, 1) for n in ("expert_ids", "w_in", "w_out")]
    assert sorted(model._ddp_params_and_buffers_to_ignore) == [*(f"_orig_mod.{n}" for n in names), *names]


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_the_router_stays_the_layer_s_after_a_state_dict_is_assigned(kind):
    """load_state_dict(assign=True) with separate tensors (safetensors, say) for the two names of
    the router's weights: still one set, the one that routes, and the one the aux loss trains."""
    model = tiny_model(kind, 4)
    patch_model(model)
    count = len(list(model.parameters()))
    state = {k: v.clone() + 0.01 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    block = moe_block(model)
    assert block.router.weight is block.moe.router_weight and len(list(model.parameters())) == count
    assert torch.equal(block.moe.router_weight, state["model.layers.0.mlp.moe.router_weight"])
    if block.moe.e_score_correction_bias is not None:
        assert block.router.e_score_correction_bias is block.moe.e_score_correction_bias


class TrainableCopy(nn.Module):
    """A router module wrapped as peft's modules_to_save wraps one: the original beside a trainable
    copy, whose weight the wrapper's `weight` property gives."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.original, self.trained = router, copy.deepcopy(router)

    @property
    def weight(self) -> torch.Tensor:
        return self.trained.weight

    def forward(self, x):
        return self.trained(x)


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_a_router_module_wrapped_or_replaced_is_refused(kind):
    """The block routes with its layer's router_weight: a copy of the router module made to train
    (peft's modules_to_save) never got a gradient, silently, and a state_dict loaded into the
    wrapper failed on tying its weight with a KeyError naming neither."""
    model = tiny_model(kind, 4)
    patch_model(model)
    block = moe_block(model)
    router = block.router
    block.router = TrainableCopy(router)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with pytest.raises(RuntimeError, match="router_weight"):
        model(input_ids=ids)
    with pytest.raises(RuntimeError, match="modules_to_save"):
        model.load_state_dict(model.state_dict())
    for wrapper in (nn.Sequential(router), Wrapping(router)):  # no `weight` of their own: not an AttributeError
        block.router = wrapper
        with pytest.raises(RuntimeError, match="no longer holds its MoELayer's router_weight"):
            model(input_ids=ids)


class Wrapping(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def trained_then_unpatched(rank, world, kind, seed):
    """patch_model, every parameter moved (the same noise on every rank: replicated ones stay
    equal), unpatch_model -> (report, whether the state_dict's names are the unpatched model's
    again, the restored model's logits against the patched one's, and a fresh unpatched model's
    that loaded the restored state_dict (strict), whether any HFMoEBlock is left)."""
    model = tiny_model(kind, seed)
    names = sorted(model.state_dict())
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed + rank))
    patch_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
        want = model(ids).logits
        report = unpatch_model(model)
        got = model(ids).logits
        fresh = tiny_model(kind, seed + 1)
        fresh.load_state_dict(model.state_dict())
        again = fresh(ids).logits
    left = any(isinstance(m, HFMoEBlock) for m in model.modules())
    return report, names == sorted(model.state_dict()), rel_err(got, want), rel_err(again, want), left


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_unpatch_model_puts_the_blocks_back_with_the_trained_weights(dist_pools, world, kind):
    """After training a patched model, its transformers blocks come back holding the layers'
    weights (every rank's experts): the same outputs, the unpatched model's state_dict names, so
    save_pretrained and an unpatched model can take it."""
    seed = fresh_seed()
    for report, same_names, err, err_fresh, left in dist_pools(world).run(trained_then_unpatched, kind, seed):
        assert list(report.values()) == ["restored"] * 2 and same_names and not left
        assert err <= 1e-5 and err_fresh <= 1e-5, (err, err_fresh)


def exported_while_patched(rank, world, kind, seed, dst=0, round_robin=False, groups=1):
    """patch_model (in `groups` expert groups of the world, each holding every expert), every
    parameter moved, hf_state_dict to rank dst -> (whether dst got the unpatched model's names
    (the others nothing), a fresh unpatched model's logits after loading it (strict) against the
    patched model's, whether the model is still patched and its logits unchanged, the largest
    tensor one all_gather sent against one expert's largest weight)."""
    model = tiny_model(kind, seed)
    names = sorted(model.state_dict())
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
    experts = block_config(moe_block(model)).num_experts
    size = world // groups
    group = ([torch.distributed.new_group(list(range(g * size, (g + 1) * size))) for g in range(groups)][rank // size]
             if groups > 1 else None)
    patch_model(model, placement=ExpertPlacement.round_robin(experts, size) if round_robin else None,
                process_group=group)
    g = torch.Generator().manual_seed(seed)
    sent, all_gather = [], torch.distributed.all_gather

    def recording(parts, t, *args, **kwargs):
        sent.append(t.numel())
        return all_gather(parts, t, *args, **kwargs)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
        want = model(ids).logits
        torch.distributed.all_gather = recording
        try:
            state = hf_state_dict(model, dst)
        finally:
            torch.distributed.all_gather = all_gather
        after = model(ids).logits
        err_fresh = None
        if rank == dst:
            fresh = tiny_model(kind, seed + 1)
            fresh.load_state_dict(state)
            err_fresh = rel_err(fresh(ids).logits, want)
    moe = moe_block(model).moe
    one_expert = max(t[0].numel() for t in (moe.w_in, moe.w_out))
    patched = isinstance(moe_block(model), HFMoEBlock)
    got_names = sorted(state) == names if rank == dst else state == {}
    return got_names, err_fresh, patched and torch.equal(after, want), max(sent, default=0), one_expert


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", list(MODELS))
def test_hf_state_dict_gives_rank_0_the_unpatched_checkpoint_while_the_model_stays_patched(dist_pools, world,
                                                                                           kind):
    """Mid-training, the checkpoint transformers would load (every rank's experts, on rank 0's
    CPU), gathered one expert at a time, the model left patched and unchanged."""
    seed = fresh_seed()
    for rank, (names, err_fresh, still_patched, largest, one_expert) in enumerate(
            dist_pools(world).run(exported_while_patched, kind, seed)):
        assert names and still_patched, rank
        assert rank > 0 or err_fresh <= 1e-5, err_fresh
        assert largest <= one_expert, (largest, one_expert)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_hf_state_dict_to_another_rank_with_experts_placed_round_robin(dist_pools, kind):
    seed = fresh_seed()
    for rank, (names, err_fresh, still_patched, largest, one_expert) in enumerate(
            dist_pools(2).run(exported_while_patched, kind, seed, 1, True)):
        assert names and still_patched, rank
        assert rank != 1 or err_fresh <= 1e-5, err_fresh
        assert largest <= one_expert, (largest, one_expert)


@pytest.mark.parametrize("dst", [0, 2])
def test_hf_state_dict_with_expert_groups_takes_dst_s_group(dist_pools, dst):
    """Two expert groups of two ranks, each holding every expert: every rank outside dst's group
    raised (dst is no rank of its layers' group), so no checkpoint could be made. dst's group
    gathers its experts; the groups are compared first."""
    seed = fresh_seed()
    for rank, (names, err_fresh, still_patched, largest, one_expert) in enumerate(
            dist_pools(4).run(exported_while_patched, "mixtral", seed, dst, True, 2)):
        assert names and still_patched, rank
        assert rank != dst or err_fresh <= 1e-5, err_fresh
        assert largest <= one_expert, (largest, one_expert)


def drifted_groups_exported(rank, world, seed):
    """Two expert groups, the second's experts moved: what hf_state_dict raised on this rank."""
    model = tiny_model("mixtral", seed)
    groups = [torch.distributed.new_group([0, 1]), torch.distributed.new_group([2, 3])]
    patch_model(model, process_group=groups[rank // 2])
    if rank >= 2:
        with torch.no_grad():
            moe_block(model).moe.w_in.add_(1.0)
    with pytest.raises(ConsistencyError) as refused:
        hf_state_dict(model)
    return str(refused.value)


def test_hf_state_dict_refuses_expert_groups_that_drifted_apart(dist_pools):
    """One group's experts would be left out of the checkpoint, silently."""
    for said in dist_pools(4).run(drifted_groups_exported, fresh_seed()):
        assert said.startswith("hf_state_dict: layer 0's expert groups differ (expert weights of rank 2"), said


def export_failing_on_rank_0(rank, world, seed, where):
    """hf_state_dict with rank 0's (dst's) own part raising: its `conversion` of a block's
    gathered weights, or its `state_dict` of the rest of the model -> what each rank raised."""
    model = tiny_model("mixtral", seed)
    patch_model(model)
    convert = hf_module.convert_block
    if rank == 0 and where == "conversion":  # of the gathered weights (that of the meta skeleton runs everywhere)
        def failing(block):
            if next(block.parameters()).is_meta:
                return convert(block)
            raise ValueError("no conversion")
        hf_module.convert_block = failing
    if rank == 0 and where == "state_dict":
        model.state_dict = lambda: (_ for _ in ()).throw(ValueError("no state_dict"))
    try:
        hf_state_dict(model)
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        hf_module.convert_block = convert
    return "nothing"


@pytest.mark.parametrize("where, what", [("conversion", "block 'model.layers.0.mlp'"),
                                         ("state_dict", "the model's state_dict")])
def test_a_failure_on_the_destination_rank_raises_on_every_rank(dist_pools, where, what):
    """(rather than leaving the other ranks in the next block's gathers)"""
    said = dist_pools(2).run(export_failing_on_rank_0, fresh_seed(), where)
    assert said[0] == f"ValueError: no {where}", said
    assert said[1] == f"RuntimeError: hf_state_dict: {what} failed on rank 0: ValueError: no {where}", said


def export_under_fully_shard(rank, world, seed):
    model = tiny_model("qwen3_moe", seed)
    patch_model(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)), ignored_params=prepare_fsdp(model))
    try:
        hf_state_dict(model)
    except DataParallelError as e:
        return str(e)
    return "nothing"


def test_hf_state_dict_refuses_a_model_under_fully_shard(dist_pools):
    for said in dist_pools(2).run(export_under_fully_shard, fresh_seed()):
        assert "under FSDP" in said and "sharded_state_dict" in said, said


def test_hf_state_dict_of_a_converted_block_has_the_block_s_own_names():
    block = moe_block(tiny_model("qwen2_moe", 5))
    names = sorted(block.state_dict())
    state = hf_state_dict(from_hf_block(block))
    assert sorted(state) == names


def test_hf_state_dict_refuses_a_dst_that_is_no_rank():
    model = tiny_model("mixtral", 3)
    patch_model(model)
    with pytest.raises(ValueError, match="dst=1"):
        hf_state_dict(model, dst=1)


def test_hf_state_dict_copies_tied_weights_once_and_leaves_the_model_s_own_alone():
    model = tiny_model("qwen2_moe", 4)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    patch_model(model)
    state = hf_state_dict(model)
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    assert state["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()
    mine = {t.data_ptr() for t in model.parameters()}
    assert not any(t.data_ptr() in mine for t in state.values())


def trained_patched_qwen2(seed: int):
    """A patched tiny qwen2_moe whose experts trained (w_out scaled), input ids and its logits."""
    model = tiny_model("qwen2_moe", seed)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
    patch_model(model)
    with torch.no_grad():
        moe_block(model).moe.w_out.mul_(1.5)  # trained (each rank's own experts)
        want = model(ids).logits
    return model, ids, want


def test_save_pretrained_of_a_patched_model_in_one_process_writes_the_unpatched_checkpoint(tmp_path):
    """transformers refused the patched model's own state_dict ("shared tensors": each block's
    router weight is also its layer's), so Trainer's checkpoints (save_pretrained with no
    state_dict, from the rank that saves) failed at the first save. In one process the patched
    model saves hf_state_dict's checkpoint by itself, as Trainer calls it, stays patched, and
    its copies do the same; unpatched, save_pretrained is the class's again."""
    model, ids, want = trained_patched_qwen2(fresh_seed())
    copied = copy.deepcopy(model)
    for m, path in ((model, tmp_path / "model"), (copied, tmp_path / "copy")):
        m.save_pretrained(path, state_dict=None, safe_serialization=True)  # Trainer's call
        loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "given", True, None)  # transformers' positional order: is_main_process, state_dict
    model.save_pretrained(tmp_path / "passed", True, hf_state_dict(model))
    for path in ("given", "passed"):
        loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(moe_block(model), HFMoEBlock)
    unpatch_model(model)
    assert "save_pretrained" not in model.__dict__
    inner = tiny_model("qwen2_moe", 3)
    patch_model(inner.model)  # a wrapper's (here the causal LM's) inner model, unpatched through the outer one
    assert "save_pretrained" in inner.model.__dict__
    unpatch_model(inner)
    assert all("save_pretrained" not in m.__dict__ and not m._load_state_dict_pre_hooks for m in inner.modules())
    model.save_pretrained(tmp_path / "unpatched")
    loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "unpatched").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def loaded_a_transformers_checkpoint(rank, world, kind, path, seed, strict, ids):
    """A patched model of `kind` after load_state_dict of the transformers checkpoint at `path`:
    (its logits, the result's missing and unexpected keys, whether every parameter is the object
    it was before (an optimizer's), whether the router module still holds the layer's weight)."""
    model = tiny_model(kind, seed)
    patch_model(model)
    params = dict(model.named_parameters())
    result = model.load_state_dict(load_file(path), strict=strict)
    block = moe_block(model)
    with torch.no_grad():
        logits = model(ids).logits
    return (logits, result.missing_keys, result.unexpected_keys,
            all(p is params[n] for n, p in model.named_parameters()), block.router.weight is block.moe.router_weight)


@pytest.mark.parametrize("world,kind", [(1, kind) for kind in MODELS] + [(2, "qwen2_moe"), (2, "gpt_oss")])
def test_a_patched_model_loads_a_transformers_checkpoint_in_load_state_dict(dist_pools, tmp_path, world, kind):
    """Trainer's resume_from_checkpoint and load_best_model_at_end load the checkpoint a patched
    model's save_pretrained wrote (transformers' layout) with load_state_dict(strict=False), which
    took its attention and norms and skipped every expert and router key (a warning only). Each
    patched block now converts its transformers block's keys as it loads them (each rank its own
    experts): the model computes what the checkpoint's model computes, strict or not, into the
    same parameters (an optimizer holding them keeps them)."""
    seed, strict = fresh_seed(), world == 1
    other = tiny_model(kind, seed + 1).eval()
    other.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = other(ids).logits
    for logits, missing, unexpected, same_params, tied in dist_pools(world).run(
            loaded_a_transformers_checkpoint, kind, str(tmp_path / "model.safetensors"), seed, strict, ids):
        assert rel_err(logits, want) < 1e-5
        assert missing == [] and unexpected == [] and same_params and tied


def test_a_patched_block_loads_its_transformers_block_s_keys_and_a_checkpoint_in_shards(tmp_path):
    """A block's own load_state_dict converts its transformers block's keys (the modules' layout:
    it has no model to take the Hub's layout's conversions from), and a checkpoint in shards
    (Trainer's load_sharded_checkpoint: one load_state_dict(strict=False) a shard) loads where
    each shard holds its blocks whole."""
    seed = fresh_seed()
    other, model = tiny_model("qwen2_moe", seed + 1).eval(), tiny_model("qwen2_moe", seed).eval()
    patch_model(model)
    ids = torch.randint(0, 97, (2, 7))
    under = "model.layers.0.mlp."
    moe_block(model).load_state_dict({k.removeprefix(under): t for k, t in other.state_dict().items()
                                      if k.startswith(under)})
    with torch.no_grad():
        x = other.model.embed_tokens(ids)
        assert rel_err(moe_block(model)(x), moe_block(other)(x)) < 1e-5
    other.save_pretrained(tmp_path / "whole")
    on_disk = load_file(str(tmp_path / "whole" / "model.safetensors"))  # the Hub's layout: experts one by one
    assert "model.layers.1.mlp.experts.0.up_proj.weight" in on_disk
    shards = {"a.safetensors": {k: t for k, t in on_disk.items() if ".layers.1." not in k},
              "b.safetensors": {k: t for k, t in on_disk.items() if ".layers.1." in k}}
    (tmp_path / "sharded").mkdir()
    for name, part in shards.items():
        save_file(part, str(tmp_path / "sharded" / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    load_sharded_checkpoint(model, str(tmp_path / "sharded"), strict=False)
    with torch.no_grad():
        assert rel_err(model(ids).logits, other(ids).logits) < 1e-5


def test_a_patched_model_refuses_a_transformers_checkpoint_it_cannot_convert_before_loading_anything(tmp_path):
    """Where a block's keys cannot be its transformers block's state_dict (keys of both layouts
    under it, or one it does not have), in either layout, load_state_dict raises naming them,
    whatever `strict` says, before any tensor of the model is copied (the other block, which it
    could convert, is unchanged too)."""
    model, _, _ = trained_patched_qwen2(fresh_seed())
    tiny_model("qwen2_moe", 5).save_pretrained(tmp_path / "hub")
    tiny_model("qwen2_moe", 5).save_pretrained(tmp_path / "modules", save_original_format=False)
    hub, modules = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hub", "modules"))
    before = {k: t.clone() for k, t in model.state_dict().items()}
    w_out = before["model.layers.1.mlp.moe.w_out"]
    cases = (({**hub, "model.layers.1.mlp.moe.w_out": w_out},
              r"also holds \['model.layers.1.mlp.moe.w_out'\], keys of the patched block's own layout"),
             ({**hub, "model.layers.1.mlp.experts.down_proj": modules["model.layers.1.mlp.experts.down_proj"]},
              r"also holds \['model.layers.1.mlp.experts.down_proj'\], keys of the transformers modules' layout"),
             ({**modules, "model.layers.1.mlp.moe.w_out": w_out}, r"unexpected \['moe.w_out'\]"))
    for state, problem in cases:
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=f"model.layers.1.mlp.* could not: .*{problem}.*Nothing of this"):
                model.load_state_dict(state, strict=strict)
            assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_hub_s_layout_reads_back_as_the_modules_and_a_disagreement_is_refused(monkeypatch, kind):
    """hub_layout.from_hub_layout runs the model's own weight conversions forwards: what
    save_pretrained writes for a model's state_dict reads back as that state_dict, bit for bit.
    It checks its result through transformers' save direction, so where the two disagree (a
    converter misread) it raises instead of handing back other weights."""
    model = tiny_model(kind, fresh_seed())
    own = model.state_dict()
    own.pop("lm_head.weight", None)  # (tied to the embedding: save_pretrained leaves it out)
    hub = hub_layout.to_hub_layout(model, own)
    back = hub_layout.from_hub_layout(model, hub)
    assert set(back) == set(own) and all(torch.equal(back[k], t) for k, t in own.items())
    written = hub_layout.to_hub_layout

    def one_element_off(m, state):
        out = dict(written(m, state))
        key = max(out)  # (any one tensor)
        out[key] = out[key].clone()
        out[key].view(-1)[0] += 1
        return out

    monkeypatch.setattr(hub_layout, "to_hub_layout", one_element_off)
    with pytest.raises(RuntimeError, match="conversions do not read .* back as written"):
        hub_layout.from_hub_layout(model, hub)


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral", "gpt_oss"])
def test_trainer_resumes_a_patched_model_as_if_it_had_not_stopped(tmp_path, kind):
    """transformers' Trainer with a patched model: resume_from_checkpoint from the checkpoint its
    save_pretrained wrote (the Hub's layout) ends where the run that did not stop ends, bit for
    bit, and load_best_model_at_end leaves the best checkpoint's model (from_pretrained of it, to
    1e-5). (transformers 5.25 itself skips those expert keys: an unpatched qwen2_moe resumed so
    ended 3.8e-2 away, and its best model 2.1e-3.)"""
    from transformers import Trainer, TrainingArguments
    g = torch.Generator().manual_seed(fresh_seed())
    data = [{"input_ids": (ids := torch.randint(0, 97, (12,), generator=g)), "labels": ids} for _ in range(24)]

    def patched():
        model = tiny_model(kind, 7)
        patch_model(model)
        return model

    def train(model, out, resume=None, **kw):
        args = TrainingArguments(str(tmp_path / out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                                 save_steps=3, report_to=[], use_cpu=True, seed=1, data_seed=1, **kw)
        trainer = Trainer(model, args, train_dataset=data, eval_dataset=data[:8])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole, resumed = patched(), patched()
    train(whole, "whole")
    train(resumed, "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    best = patched()
    trainer = train(best, "best", eval_strategy="steps", eval_steps=3, load_best_model_at_end=True)
    saved = type(best).from_pretrained(trainer.state.best_model_checkpoint).eval()
    ids = torch.randint(0, 97, (2, 9), generator=g)
    with torch.no_grad():
        assert rel_err(best.eval()(ids).logits, saved(ids).logits) < 1e-5
        assert rel_err(best(ids).logits, tiny_model(kind, 7).eval()(ids).logits) > 1e-3  # it trained


@pytest.mark.parametrize("kind", ["gpt_oss", "llama4"])
def test_a_shard_of_a_block_s_router_alone_waits_for_the_experts(kind):
    """gpt-oss's and Llama-4's router modules keep their name ("router") in the patched block, so a
    shard holding a block's router keys alone loaded them as the block's own, and the next shard,
    with its experts, was refused: the block half loaded. Keys under a block without its layer's
    ("moe.") are its transformers block's: a part of them waits for the rest, nothing of the block
    loaded."""
    model = tiny_model(kind, fresh_seed())
    patch_model(model)
    other = tiny_model(kind, 3)
    state = other.state_dict()
    block = next(name for name, m in model.named_modules() if isinstance(m, HFMoEBlock))
    router = {k: t for k, t in state.items() if k.startswith(f"{block}.router.")}
    before = {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(router, strict=False)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    ids = torch.randint(0, 97, (2, 7))
    with pytest.raises(RuntimeError, match=f"{block}: a load_state_dict took \\d of its transformers "
                                           "block's keys .* holds them back, nothing of the block loaded"):
        model(ids)
    model.load_state_dict({k: t for k, t in state.items() if k not in router}, strict=False)
    with torch.no_grad():
        assert rel_err(model(ids).logits, other(ids).logits) < 1e-5


@pytest.mark.parametrize("kind", ["qwen2_moe", "mixtral", "gpt_oss", "deepseek_v3"])
def test_a_checkpoint_whose_shards_split_its_blocks_loads_shard_by_shard(tmp_path, kind):
    """save_pretrained fills its shards tensor by tensor, so a block may straddle two whatever
    max_shard_size says (here every tensor has a shard of its own), and Trainer's
    load_sharded_checkpoint loads one shard a load_state_dict(strict=False). A block's part waits,
    nothing of the block loaded and its forward refusing to run, until the load that brings the
    rest; then the model computes what the checkpoint's model computes."""
    seed = fresh_seed()
    other, model = tiny_model(kind, seed + 1), tiny_model(kind, seed)
    patch_model(model)
    other.save_pretrained(tmp_path / "ckpt", max_shard_size=1)
    where = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(where.values()))
    block = next(name for name, m in model.named_modules() if isinstance(m, HFMoEBlock))
    under = (block + ".", block.rsplit(".", 1)[0] + ".block_sparse_moe.")  # (Mixtral's Hub layout: the latter)
    held = sorted(shards.index(f) for k, f in where.items() if k.startswith(under))
    first = shards[:held[len(held) // 2]]  # the shards up to the middle of the first block's
    before = {k: t.clone() for k, t in model.state_dict().items()}
    for name in first:
        model.load_state_dict(load_file(str(tmp_path / "ckpt" / name)), strict=False)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items() if k.startswith(block + "."))
    ids = torch.randint(0, 97, (2, 7))
    with pytest.raises(RuntimeError, match=f"{block}: a load_state_dict took .* holds them back"):
        model(ids)
    for name in shards[len(first):]:
        model.load_state_dict(load_file(str(tmp_path / "ckpt" / name)), strict=False)
    fresh = tiny_model(kind, seed)
    patch_model(fresh)
    load_sharded_checkpoint(fresh, str(tmp_path / "ckpt"), strict=False)
    with torch.no_grad():
        want = other(ids).logits
        assert rel_err(model(ids).logits, want) < 1e-5 and rel_err(fresh(ids).logits, want) < 1e-5


@pytest.mark.parametrize("kind, hub_block", [("qwen3_moe", "mlp"), ("mixtral", "block_sparse_moe")])
def test_a_held_part_gives_way_to_a_whole_checkpoint_and_joins_its_rest_through_a_wrapper(tmp_path, kind, hub_block):
    """A part held back by a load that never finished stays out of the way: a later whole
    checkpoint, in the block's own layout or the transformers modules' (a key of the new load
    replaces the held one, a part that cannot join it is dropped), loads and runs, nothing left
    held; and a part held through a module holding the model joins the model's own load (its keys
    are kept relative to the model)."""
    seed = fresh_seed()
    a, b = tiny_model(kind, seed + 1), tiny_model(kind, seed + 2)
    a.save_pretrained(tmp_path)
    hub = load_file(str(tmp_path / "model.safetensors"))
    router = f"model.layers.0.{hub_block}.gate.weight"
    expert = {k: t for k, t in hub.items() if k.startswith(f"model.layers.0.{hub_block}.experts.0.")}
    patched_b = tiny_model(kind, seed + 2)
    patch_model(patched_b)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        want = b(ids).logits
    for part, whole in (({router: hub[router]}, patched_b.state_dict()),  # the block's own layout
                        (expert, b.state_dict()),  # the transformers modules' layout, beside a held Hub part
                        ({router: hub[router]}, hub)):  # the same key again: a whole checkpoint replaces it
        model = tiny_model(kind, seed)
        patch_model(model)
        model.load_state_dict(part, strict=False)
        with pytest.raises(RuntimeError, match="model.layers.0.mlp: a load_state_dict took .* holds them back"):
            model(ids)
        model.load_state_dict(whole, strict=False)
        assert not model.__dict__["_held_keys"]  # nothing stays held
        with torch.no_grad():
            assert rel_err(model(ids).logits, want if whole is not hub else a(ids).logits) < 1e-5
    model = tiny_model(kind, seed)
    patch_model(model)
    nn.ModuleDict({"inner": model}).load_state_dict({f"inner.{router}": hub[router]}, strict=False)
    model.load_state_dict({k: t for k, t in hub.items() if k != router}, strict=False)
    with torch.no_grad():
        assert rel_err(model(ids).logits, a(ids).logits) < 1e-5


def test_a_model_whose_block_waits_refuses_to_be_saved_or_unpatched(tmp_path):
    """While a block waits for the rest of a checkpoint its weights are neither the old ones nor
    the checkpoint's: hf_state_dict, save_pretrained and unpatch_model refuse, naming it, where they
    wrote or restored the old weights silently."""
    model = tiny_model("qwen2_moe", fresh_seed())
    patch_model(model)
    model.load_state_dict({"model.layers.1.mlp.gate.weight": torch.randn(8, 32)}, strict=False)
    for call in (lambda: hf_state_dict(model), lambda: model.save_pretrained(tmp_path), lambda: unpatch_model(model)):
        with pytest.raises(RuntimeError, match="the block model.layers.1.mlp waits for the rest of a checkpoint"):
            call()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_checkpoint_in_another_dtype_loads_as_into_the_unpatched_model(tmp_path, dtype):
    """A float16 or float64 checkpoint: the conversion refused its dtype (flashmoe_py computes in
    float32 and bfloat16), where an unpatched model casts it as it copies. Now the patched model
    holds what the unpatched one does, for the layer's dtype and for bfloat16."""
    seed = fresh_seed()
    tiny_model("qwen2_moe", seed + 1).to(dtype).save_pretrained(tmp_path / "hub")
    tiny_model("qwen2_moe", seed + 1).to(dtype).save_pretrained(tmp_path / "modules", save_original_format=False)
    hub, modules = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hub", "modules"))
    for into in (torch.float32, torch.bfloat16):
        plain, patched = tiny_model("qwen2_moe", seed).to(into), tiny_model("qwen2_moe", seed).to(into)
        patch_model(patched)
        plain.load_state_dict(modules)  # (an unpatched model's load_state_dict takes this layout alone)
        patched.load_state_dict(hub)
        ids = torch.randint(0, 97, (2, 7))
        with torch.no_grad():
            assert rel_err(patched(ids).logits.float(), plain(ids).logits.float()) < (1e-5 if into == torch.float32
                                                                                      else 1e-2)


def test_assign_takes_a_transformers_checkpoint_in_the_layer_s_dtype_and_refuses_another_first(tmp_path):
    """load_state_dict(assign=True): the converted weights are contiguous (a transposed expert weight
    was a strided view, which backend flash refuses to assign), and where they are not in the
    layer's dtype the load raises before anything of the model is assigned (the layer refused
    them after the other modules had taken theirs: a model of mixed dtypes)."""
    seed = fresh_seed()
    other = tiny_model("qwen2_moe", seed + 1)
    other.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    model = tiny_model("qwen2_moe", seed)
    patch_model(model)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        layer.backend.contiguous_weights = True  # what backend flash asks of assigned weights
    model.load_state_dict(state, assign=True)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert rel_err(model(ids).logits, other(ids).logits) < 1e-5
    bf16 = tiny_model("qwen2_moe", seed).to(torch.bfloat16)
    patch_model(bf16)
    before = {k: t.clone() for k, t in bf16.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"assign=True.: the state_dict's weights of the patched block "
                                           r"model.layers.\d.mlp are torch.float32 on cpu .*, its layer's are "
                                           r"torch.bfloat16 on cpu.* Nothing of this state_dict was loaded"):
        bf16.load_state_dict(state, assign=True)
    after = bf16.state_dict()
    assert all(after[k].dtype == t.dtype and torch.equal(after[k], t) for k, t in before.items())
    fp32 = tiny_model("qwen2_moe", seed)
    patch_model(fp32)
    own = fp32.state_dict()
    for wrong, problem in (({k: t.half() for k, t in state.items()}, r"is torch.float16, which assign=True would"),
                           ({**own, "model.layers.0.mlp.moe.w_in": own["model.layers.0.mlp.moe.w_in"].double()},
                            r"are torch.float64 on cpu \(w_in\), its layer's are torch.float32")):
        with pytest.raises(RuntimeError, match=problem):
            fp32.load_state_dict(wrong, assign=True)
        assert all(t.dtype == torch.float32 for t in fp32.state_dict().values() if t.is_floating_point())


def test_a_transformers_model_inside_another_module_loads_its_checkpoint_in_the_hub_s_layout(tmp_path):
    """patch_model on a module holding a transformers model (Mixtral, whose Hub layout puts the
    experts under block_sparse_moe, outside the patched block): its state_dict of the Hub's layout
    under the holder's name is read through the transformers model's conversions."""
    seed = fresh_seed()
    other, holder = tiny_model("mixtral", seed + 1).eval(), nn.ModuleDict({"inner": tiny_model("mixtral", seed)})
    patch_model(holder)
    other.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(".block_sparse_moe.experts.0." in k for k in on_disk)
    result = holder.load_state_dict({f"inner.{k}": t for k, t in on_disk.items()}, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert rel_err(holder["inner"].eval()(ids).logits, other(ids).logits) < 1e-5


def saved_by_one_rank(rank, world, path, seed):
    model, _, _ = trained_patched_qwen2(seed)
    try:
        model.save_pretrained(path)  # Trainer saves from rank 0 only: hf_state_dict would wait for the others
    except ValueError as e:
        return str(e)
    return None


def test_save_pretrained_of_a_patched_model_across_ranks_without_state_dict_names_how(dist_pools, tmp_path):
    errors = dist_pools(2).run(saved_by_one_rank, str(tmp_path / "ckpt"), fresh_seed())
    for error in errors:
        assert error is not None and "at world size 2" in error and "state_dict=fm.hf_state_dict(model)" in error
        assert "save_strategy='no'" in error
    assert not (tmp_path / "ckpt").exists()


def saved_while_patched(rank, world, path, seed):
    model, ids, want = trained_patched_qwen2(seed)
    model.save_pretrained(path, state_dict=hf_state_dict(model), is_main_process=rank == 0)
    return ids, want


def test_a_patched_model_saves_a_transformers_checkpoint_through_hf_state_dict(dist_pools, tmp_path):
    ids, want = dist_pools(2).run(saved_while_patched, str(tmp_path), fresh_seed())[0]
    loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_a_restored_model_saves_and_loads_with_transformers(tmp_path):
    model = tiny_model("qwen2_moe", 6)
    ids = torch.randint(0, 97, (2, 7))
    patch_model(model)
    with torch.no_grad():
        model.model.layers[0].mlp.moe.w_out.mul_(1.5)  # trained
        want = model(ids).logits
    unpatch_model(model)
    model.save_pretrained(tmp_path)
    loaded = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def _hook_holding(module, args, output, big=None) -> None:
    """A forward hook that holds `big` (module-level: torch.save pickles hooks)."""


def test_a_patched_model_pickles_and_its_skeletons_hold_no_hooks(tmp_path):
    """torch.save(model) pickles every hook (load_state_dict's post hook is a module function);
    a hook on the original block (which may hold the whole model) moves to the HFMoEBlock and is
    not copied into the skeleton."""
    model = tiny_model("mixtral", 7)
    big = torch.zeros(1 << 16)
    moe_block(model).register_forward_hook(functools.partial(_hook_holding, big=big))
    patch_model(model)
    torch.save(model, tmp_path / "model.pt")
    assert len(moe_block(model)._forward_hooks) == 1
    skeleton = moe_block(model)._skeleton
    assert all(not m._forward_hooks for m in skeleton.modules())
    assert all(t.is_meta for t in skeleton.parameters())


@pytest.mark.parametrize("tie", ["a router", "one block", "a dense layer"])
def test_blocks_tied_to_the_rest_of_the_model_are_left_alone(tie):
    """A layer holds copies of its block's weights: converting a block whose module or parameters
    the model also reaches elsewhere would untie them at the first optimizer step (patched and
    unpatched training apart by 1e-5..1e-4 after one SGD step). Every block so tied is left
    alone, the first one met too; an untied one is replaced."""
    kind = "qwen2_moe" if tie == "a dense layer" else "mixtral"
    model = tiny_model(kind, 8)
    layers = model.model.layers
    if tie == "a router":
        layers[1].mlp.gate = layers[0].mlp.gate
    elif tie == "one block":
        layers[1].mlp = layers[0].mlp
    else:  # the shared expert's up projection tied to another module's (a dense MLP's, say)
        model.dense = torch.nn.Linear(1, 1)
        model.dense.weight = layers[0].mlp.shared_expert.up_proj.weight
    report = patch_model(model)
    why = {"a router": "shares parameters with 'model.layers.1.mlp.gate'",
           "one block": "is also the module at 'model.layers.1.mlp'",
           "a dense layer": "shares parameters with 'dense'"}[tie]
    assert report["model.layers.0.mlp"].split(": ", 1)[1].startswith(why)
    replaced = tie == "a dense layer"  # layer 1's block is tied to nothing then
    assert (report["model.layers.1.mlp"] == "replaced") == replaced
    assert [isinstance(layer.mlp, HFMoEBlock) for layer in layers[:2]] == [False, replaced]


@pytest.mark.parametrize("kind, name", [("deepseek_v3", "e_score_correction_bias"), ("gpt_oss", "bias")])
def test_a_router_bias_given_to_the_router_module_is_refused_and_one_updated_in_place_is_read(kind, name):
    """The layer kept routing with its own tensor while to_hf exported the module's new one (a
    relative error of 0.77 against the unpatched model, silently; gpt-oss also returned router
    scores from the new bias beside hidden states routed with the old)."""
    model = tiny_model(kind, 6)
    patch_model(model)
    router = moe_block(model).router
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    new = getattr(router, name).detach() + 0.3
    setattr(router, name, new if name == "e_score_correction_bias" else nn.Parameter(new))
    model.to("cpu")  # a move where it is: the router module keeps the tensor it was given
    with pytest.raises(RuntimeError, match=f"given another {name} tensor.*update it in place"):
        model(input_ids=ids)
    mine = getattr(moe_block(model).moe, "router_bias" if name == "bias" else name)
    setattr(router, name, mine)  # tied again: updated in place, the layer reads it
    unpatched = tiny_model(kind, 6)
    with torch.no_grad():
        getattr(convert_block(moe_block(unpatched)).router, name).add_(0.3)
        getattr(router, name).add_(0.3)
        assert rel_err(model(input_ids=ids).logits, unpatched(input_ids=ids).logits) <= 1e-5


def _with_absmax(module, state, prefix, local_metadata) -> None:
    """A state_dict hook adding a key that is no attribute path (as a quantizer's statistics)."""
    state[prefix + "weight.absmax"] = torch.ones(1)


def test_hf_state_dict_of_a_wrapped_model_has_the_unwrapped_names():
    """torch.compile's "_orig_mod." (and DDP's "module.") prefixed every name: from_pretrained
    then started every weight afresh, with only a load report's warning (relative error 1.05).
    Under the activation-checkpoint wrapper the layers' own tensors (w_in, expert_ids, ...) were
    exported beside the block's. A key that is no attribute path is kept as it is."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    model = tiny_model("mixtral", 7)
    model.model.norm._register_state_dict_hook(_with_absmax)
    want = sorted(model.state_dict())
    assert "model.norm.weight.absmax" in want
    patch_model(model)
    assert sorted(hf_state_dict(torch.compile(model))) == want
    for wrapped in ("MixtralDecoderLayer", "HFMoEBlock"):  # a wrapper above the block, then of the block itself
        checkpointed = copy.deepcopy(model)
        apply_activation_checkpointing(checkpointed, check_fn=lambda m, w=wrapped: type(m).__name__ == w)
        assert sorted(hf_state_dict(checkpointed)) == want, wrapped


def test_patch_model_and_unpatch_model_of_a_block_itself_are_refused():
    """unpatch_model(block) said "restored" and changed nothing (it set a child named ''), and
    patch_model(block) raised an AttributeError naming ''."""
    block = moe_block(tiny_model("mixtral", 8))
    with pytest.raises(ValueError, match=r"itself an MoE block.*flashmoe_py\.hf\.from_hf_block\(block\)"):
        patch_model(block)
    with pytest.raises(ValueError, match=r"itself an HFMoEBlock.*to_hf\(\)"):
        unpatch_model(from_hf_block(block))


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_unpatched_blocks_share_the_model_s_config_and_take_its_train_or_eval_mode(kind):
    """A review's finds: the blocks put back held a copy of the model's config frozen at patching
    (set_experts_implementation then changed nothing of theirs), and the train flag they had then."""
    model = tiny_model(kind, 10)
    model.train()
    patch_model(model)
    model.eval()
    unpatch_model(model)
    block = moe_block(model)
    configs = [v for m in block.modules() for v in vars(m).values() if isinstance(v, type(model.config))]
    assert configs and all(c is model.config for c in configs)
    assert not any(m.training for m in model.modules())


def test_trainer_decays_the_same_parameters_patched_as_unpatched():
    """transformers' Trainer keeps names with "bias" out of weight decay (as does the common
    `"bias" in name` rule): the layer's expert biases (gpt-oss's gate_up_proj_bias and
    down_proj_bias) are named bias_in and bias_out, so it decays the same parameters of a patched
    model as of the unpatched one (named b_in and b_out before, they were decayed: 1e-3 apart
    after one AdamW step)."""
    from transformers import Trainer

    def decayed(model) -> list[tuple]:  # the shapes of the parameters Trainer decays, each once
        params = dict(model.named_parameters(remove_duplicate=False))  # (its names include unset ones)
        unique = {id(params[n]): params[n] for n in Trainer.get_decay_parameter_names(object.__new__(Trainer), model)
                  if n in params}
        return sorted(tuple(p.shape) for p in unique.values())

    model = tiny_model("gpt_oss", 11)
    plain = decayed(model)
    patch_model(model)
    names = dict(model.named_parameters())
    assert any(n.endswith(".bias_in") for n in names) and any(n.endswith(".bias_out") for n in names)
    assert decayed(model) == plain  # (w_in holds gate_up_proj, w_out down_proj: the same shapes)


def test_hooks_on_a_block_move_to_its_replacement_and_back_and_hooks_it_cannot_run_are_refused():
    """Hooks on the replaced block never fired after patching, and the report said "replaced".
    The block's own move to the HFMoEBlock (and back at unpatch_model; the module left behind
    keeps none), a forward hook on its router module runs the router, and a block whose hooks
    the layer cannot honour (on its experts, which it computes itself; a router pre-hook, which
    could not change what it routes) is left alone, saying why, or raises once patched."""
    model = tiny_model("mixtral", 9)
    block, seen = moe_block(model), []
    handle = block.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    block.gate.register_forward_hook(lambda m, i, o: seen.append("router"))
    assert patch_model(model)["model.layers.0.mlp"] == "replaced"
    assert not block._forward_hooks  # moved, not shared
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    model(input_ids=ids)
    assert seen == ["router", "HFMoEBlock"]
    unpatch_model(model)
    seen.clear()
    model(input_ids=ids)
    assert seen == ["router", "MixtralSparseMoeBlock"]
    handle.remove()
    seen.clear()
    model(input_ids=ids)
    assert seen == ["router"]
    for where in ("experts", "gate"):
        other = tiny_model("mixtral", 9)
        hooked = getattr(moe_block(other), where)
        if where == "experts":
            hooked.register_forward_hook(lambda *args: None)
        else:
            hooked.register_forward_pre_hook(lambda *args: None)
        report = patch_model(other)["model.layers.0.mlp"]
        assert ("submodule(s) ['experts'] have hooks, which would never run" if where == "experts" else
                "router module has a forward pre-hook or a backward hook") in report, report
        assert not isinstance(moe_block(other), HFMoEBlock)
    patched = tiny_model("mixtral", 9)
    patch_model(patched)
    moe_block(patched).router.register_full_backward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="router module .* has a forward pre-hook or a backward hook"):
        patched(input_ids=ids)


def test_a_patched_model_moved_where_it_is_keeps_its_router_tied():
    """Module.to(cpu:0) and to_empty give the router module a copy of its correction bias while
    the layer keeps its own (a copy would hold nothing new): the next forward then refused the
    untied bias. The block ties its router module to the layer again after every move."""
    model = tiny_model("deepseek_v3", 11)
    patch_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        model.to(torch.device("cpu", 0))
        assert moe_block(model).router.e_score_correction_bias is moe_block(model).moe.e_score_correction_bias
        assert torch.equal(model(input_ids=ids).logits, want)


def test_a_patched_model_cast_elsewhere_is_refused_before_any_module_moves():
    """model.bfloat16() reached the first patched block's layer after the embedding and the first
    attention had been cast: the layer refused, the model was left in two dtypes, and a .float()
    to undo it rounded those weights through bf16 (2.5e-3 of the logits). The model and every
    module between it and a block refuse first now, naming the remedy; copies and pickles too."""
    model = tiny_model("mixtral", 13)
    patch_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    dtypes = {n: t.dtype for n, t in model.state_dict().items()}
    copied = copy.deepcopy(model)
    pickled = io.BytesIO()
    torch.save(model, pickled)
    pickled.seek(0)
    loaded = torch.load(pickled, weights_only=False)
    casts = [model.bfloat16, model.half, lambda: model.to(torch.float64), model.model.bfloat16,
             model.model.layers[0].bfloat16, moe_block(model).bfloat16, copied.bfloat16, loaded.bfloat16]
    for cast in casts:
        with pytest.raises(ValueError, match="cannot move router_weight from torch.float32 on cpu to torch.*nothing "
                                             "was moved.*unpatch_model"):
            cast()
    for m in (model, copied, loaded):
        assert {n: t.dtype for n, t in m.state_dict().items()} == dtypes
        with torch.no_grad():
            assert torch.equal(m(input_ids=ids).logits, want)
    model.float().to("cpu")  # where it is: taken
    unpatch_model(model)
    model.bfloat16()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_a_model_patched_under_inference_mode_trains():
    """The layers were built of inference tensors there, and the first backward failed in torch
    ("Inference tensors cannot be saved for backward"), where the unpatched model trained."""
    ids = torch.randint(0, 64, (2, 5))
    grads = []
    for inference in (True, False):
        model = tiny_model("qwen3_moe", 14)
        with torch.inference_mode(inference):
            patch_model(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[1])


def test_from_hf_block_leaves_the_block_s_hooks_on_it():
    """The block is the caller's, maybe still in their model: only patch_model, which replaces
    it, moves its hooks."""
    model = tiny_model("mixtral", 12)
    block, seen = moe_block(model), []
    block.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    replacement = from_hf_block(block)
    model(input_ids=torch.randint(0, model.config.vocab_size, (1, 3)))
    assert seen == ["MixtralSparseMoeBlock"] and not replacement._forward_hooks


@pytest.mark.parametrize("kind", ["gpt_oss", "llama4", "deepseek_v3"])
def test_a_routing_attribute_changed_on_the_router_module_is_refused(kind):
    """gpt-oss's and Llama-4's routers keep top_k on the router module, which the patched block
    keeps: set to 1 after patching it was ignored (the patched model 3.1e-1 / 4.8e-1 off the
    unpatched one's, silently). The layer's config is fixed when built, so the change is refused."""
    model = tiny_model(kind, 8)
    patch_model(model)
    router = moe_block(model).router
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    was = router.top_k
    router.top_k = 1
    with pytest.raises(RuntimeError, match=f"has top_k=1, but its MoELayer was built from top_k={was}"):
        model(input_ids=ids)
    router.top_k = was
    model(input_ids=ids)


def sgd_step(model, opt, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_an_optimizer_built_before_patching_or_unpatching_is_refused_at_its_step(kind):
    """An optimizer built before patch_model held the transformers blocks' tensors, which no longer
    compute anything: its step trained the rest of the model and left the experts, the router and
    the shared experts as they were, silently (up to 3.2e-2 off the unpatched step's weights)."""
    ids = torch.randint(0, 97, (2, 5))
    model = tiny_model(kind, 9)
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    patch_model(model)
    with pytest.raises(RuntimeError, match=r"SGD holds \d+ parameter\(s\) no longer in the model, e\.g\. "
                                           r"model\.layers\.0\.mlp\..*\(patch_model\).*Build the optimizer after"):
        sgd_step(model, early, ids)
    model.zero_grad()  # (that backward ran)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built after patching: steps as the unpatched model's
    sgd_step(model, opt, ids)
    reference = tiny_model(kind, 9)
    sgd_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1), ids)
    unpatch_model(model)
    trained, want = model.state_dict(), reference.state_dict()
    assert trained.keys() == want.keys()
    assert max(rel_err(trained[k], want[k]) for k in want if want[k].is_floating_point()) <= 1e-5
    with pytest.raises(RuntimeError, match=r"\(unpatch_model\)"):  # checked again: the model changed since
        opt.step()


def test_parameters_the_model_still_holds_or_holds_again_are_not_refused():
    """A block's parameter the model also holds elsewhere (tied to a module outside the blocks) was
    never taken out; a block put back by hand holds its parameters again: an optimizer over
    model.parameters() steps in both (both were refused, naming a parameter that was there)."""
    ids = torch.randint(0, 97, (2, 5))
    model = tiny_model("mixtral", 11)
    model.tied = nn.Linear(TINY["hidden_size"], 8, bias=False)
    model.tied.weight = moe_block(model).gate.weight  # [8 experts, hidden]: the router's own tensor
    blocks = [layer.mlp for layer in model.model.layers]
    patch_model(model)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for layer, block in zip(model.model.layers, blocks):
        layer.mlp = block
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sgd_step(model, opt, ids)
    assert all(p.grad is not None for p in blocks[0].experts.parameters())


def test_a_router_module_wrapped_keeps_the_wrapped_message_and_an_old_pickle_runs():
    """A wrapper without the router's attributes (peft's LoRA around Llama-4's router, an
    nn.Linear) said "top_k=None ... set it back"; it gets the wrapped-router message. A block
    pickled before the routing attributes were kept has none to compare: it runs."""
    model = tiny_model("llama4", 12)
    patch_model(model)
    block = moe_block(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    router = block.router
    block.router = Wrapping(router)
    block.router.weight = router.weight
    with pytest.raises(RuntimeError, match="no longer holds its MoELayer's router_weight: it was replaced or wrapped"):
        model(input_ids=ids)
    block.router = router
    del block._routing
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)


def test_patch_model_leaves_torch_s_generator_as_it_was():
    """Each layer drew its seed from torch's default generator (weights it then overwrote with the
    block's): patching changed a seeded program's later draws."""
    model = tiny_model("mixtral", 10)
    torch.manual_seed(5)
    patch_model(model)
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(4))


@pytest.mark.parametrize("bad", ["first", "second"])
def test_a_bad_tensor_in_a_block_split_across_shards_is_refused_not_held(tmp_path, bad):
    """A block whose shards hold a tensor of the wrong shape: its conversion fails when the rest
    joins the held part, and that error is raised (a retry without the held part held the rest as
    another part, the load returned and the block waited for ever)."""
    other, model = tiny_model("qwen3_moe", fresh_seed()), tiny_model("qwen3_moe", 1)
    patch_model(model)
    other.save_pretrained(tmp_path, save_original_format=False)
    state = load_file(str(tmp_path / "model.safetensors"))
    under = "model.layers.0.mlp."
    first = {k: state[k] for k in sorted(k for k in state if k.startswith(under))[:1]}
    second = {k: t for k, t in state.items() if k not in first}
    part = first if bad == "first" else second
    key = next(k for k in sorted(part) if k.startswith(under))
    part[key] = part[key][..., :-1].contiguous()
    model.load_state_dict(first, strict=False)
    with pytest.raises(RuntimeError, match=f"(?s){under[:-1]} is a patched block .* could not: .*size mismatch"):
        model.load_state_dict(second, strict=False)
