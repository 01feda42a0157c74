"""Hugging Face MoE blocks swapped for MoELayer: same outputs, on 1 and 2 ranks; torch.compile."""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashmoe_py import MoELayer  # noqa: E402
from flashmoe_py.hf import HFMoEBlock, UnsupportedBlock, block_config, from_hf_block, patch_model  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)


def tiny_model(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**TINY, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=3, norm_topk_prob=True, head_dim=8)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**TINY, moe_intermediate_size=24, num_experts=8,
                                          num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                          norm_topk_prob=False)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(**TINY, num_experts=8, num_experts_per_tok=2)
        model = transformers.OlmoeForCausalLM(cfg)
    for p in model.parameters():  # HF leaves some weights at zero; make every path matter
        p.data.normal_(0, 0.2)
    return model.eval()


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
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"])
def test_patched_model_matches_original(dist_pools, world, kind):
    seed = random.SystemRandom().randrange(2**20)
    for replaced, err in dist_pools(world).run(patched_vs_original, kind, seed):
        assert replaced == 2  # one MoE block per decoder layer
        assert err <= 1e-5


def test_block_adapter_keeps_only_this_ranks_experts():
    model = tiny_model("mixtral", 0)
    block = model.model.layers[0].mlp
    cfg = block_config(block)
    assert (cfg.num_experts, cfg.top_k, cfg.ffn_size, cfg.renormalize) == (8, 2, 48, True)
    new = from_hf_block(block)
    assert isinstance(new, HFMoEBlock) and new.moe.w_in.shape == (8, 32, 96)
    torch.testing.assert_close(new.moe.w_out[3], block.experts.down_proj[3].t())


def test_deepseek_router_is_reported_not_converted():
    cfg = transformers.DeepseekV3Config(**{**TINY, "hidden_size": 64}, moe_intermediate_size=16,
                                        n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                        topk_group=1, first_k_dense_replace=0, kv_lora_rank=16,
                                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=8)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    report = patch_model(model)
    assert report and all("grouped sigmoid routing" in v for v in report.values())
    with pytest.raises(UnsupportedBlock):
        block_config(model.model.layers[0].mlp)


def test_compiled_layer_has_no_graph_break():
    layer = MoELayer(block_config(tiny_model("olmoe", 1).model.layers[0].mlp).replace(), seed=3)
    x = torch.randn(2, 5, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x))
