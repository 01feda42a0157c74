"""The contract between launcher, heap and kernel (kernels/layout.py, workspace.py,
launch_config.py): what a layer allocates, how a launch is chosen, how a timeout is reported."""

import pytest
import torch

from flashmoe_py import MoEConfig, preset
from flashmoe_py.backends.flash import sms_limited_by_mps
from flashmoe_py.kernels.launch_config import FIELDS, SWITCHES, LaunchConfig, choose_launch, launch_variants
from flashmoe_py.kernels.layout import (STATUS_WORDS, WAIT_CHUNK, WAIT_COUNTS, WAIT_HIDDEN, WAIT_HIDDEN_STATIC,
                                        WAIT_SHARED_HIDDEN, WAIT_SHARED_OUT,
                                        Geometry, describe_timeout, heap_bytes, heap_bytes_for)
from flashmoe_py.kernels.workspace import LocalBuffers, Workspace

SMS = 132


def geometry(name="qwen3_30b_a3b", world=1, tokens=4096, **changes):
    return Geometry.for_config(preset(name, **changes), world, tokens)


@pytest.mark.parametrize("transport", ["p2p", "nvshmem"])
def test_workspace_holds_every_buffer_of_the_geometry_zeroed(transport):
    geo = geometry("tiny", world=4, tokens=50)
    ws = Workspace.allocate(geo, torch.float32, transport, "cpu", LocalBuffers("cpu", 4))
    buffers = geo.symmetric_buffers(torch.float32, transport)
    for name in ("recv_x", "combine_y", "count_words", "chunk_flags", "combine_counts"):
        buf = getattr(ws.sym, name)
        assert (tuple(buf.local.shape), buf.local.dtype) == buffers[name] and not buf.local.any()
        assert buf.peers.shape == (4,) and int(buf.peers[0]) == buf.local.data_ptr()
    if transport == "nvshmem":  # NVSHMEM's puts take this rank's addresses, for every peer
        assert (ws.sym.recv_x.peers == ws.sym.recv_x.local.data_ptr()).all()
        assert tuple(ws.sym.send_x.shape) == buffers["send_x"][0]
    else:  # peers 1.. point at a scratch copy, never at rank 0's own
        assert len(set(ws.sym.recv_x.peers.tolist())) == 2
    for name, (shape, dtype) in geo.local_buffers(torch.float32).items():
        t = getattr(ws.scratch, name)
        assert (tuple(t.shape), t.dtype) == (shape, dtype)
    assert ws.scratch.ctl.tolist() == [1, 0, 0, 0] and not ws.scratch.status.any()


def test_heap_bytes_are_granule_rounded_buffers_plus_the_reserve():
    geo = geometry("deepseek_v3", world=8, tokens=4096)
    buffers = geo.symmetric_buffers(torch.bfloat16)
    assert heap_bytes_for(preset("deepseek_v3"), 8, 4096) == heap_bytes(buffers)
    assert heap_bytes({"a": ((1,), torch.uint8)}) == (64 << 20) + (2 << 20)


def test_a_missing_hidden_tile_of_the_static_order_names_it_as_the_likely_cause():
    status = [0] * STATUS_WORDS
    status[:6] = [1, WAIT_HIDDEN_STATIC.value, 0, 2, 7, 3]
    text = describe_timeout(status, rank=0)
    assert "a hidden tile from another program" in text and "launch_override={'static_ffn_in': 0}" in text
    status[1] = WAIT_HIDDEN.value  # from the queue: no static order to blame
    text = describe_timeout(status, rank=0)
    assert "a hidden tile from another program" in text and "static_ffn_in" not in text


@pytest.mark.parametrize("wait, words", [(WAIT_SHARED_HIDDEN, "the shared experts' hidden tiles from other programs"),
                                         (WAIT_SHARED_OUT, "the shared experts' output from other programs")])
def test_a_shared_experts_wait_is_named_with_its_tile(wait, words):
    """They had the routed experts' wording, with this rank as the peer, and no tile."""
    status = [0] * STATUS_WORDS
    status[:6] = [1, wait.value, -1, -1, 5, 2]
    want = f"fused MoE kernel on rank 3 timed out in call 2 waiting for {words} (tile 5)"
    assert describe_timeout(status, rank=3) == want


def test_a_timeout_is_described_by_its_status_words():
    status = [0] * STATUS_WORDS
    assert describe_timeout(status, rank=3) is None
    status[:6] = [1, WAIT_CHUNK.value, 2, 5, 17, 9]
    assert describe_timeout(status, rank=3) == ("fused MoE kernel on rank 3 timed out in call 9 waiting for "
                                                "a dispatched chunk to arrive from rank 2 (local expert 5, tile 17)")
    status[:6] = [1, WAIT_COUNTS.value, -1, -1, -1, 4]
    assert describe_timeout(status, rank=0).endswith("waiting for count words (what each source sends)")


@pytest.mark.parametrize("world,tokens,block_m,stages", [(1, 128, 64, 4), (1, 1023, 64, 4), (1, 1024, 128, 3),
                                                          (2, 512, 64, 4), (2, 1023, 64, 4), (2, 1024, 128, 3)])
def test_bf16_tiles_grow_tall_once_experts_fill_them_and_stream_deeper_before(world, tokens, block_m, stages):
    """qwen3: 128 experts, top-8, so tokens * 8 / (128 / world) rows a local expert (tokens a
    rank); 64 rows or more at world 1 (128 on several ranks) take 128 x 256 tiles, fewer 64 x 256
    tiles with a fourth pipeline stage (weight-bound decode)."""
    launch = choose_launch(geometry(world=world, tokens=tokens), tokens, torch.bfloat16, SMS)
    assert (launch.block_m, launch.block_n, launch.stages) == (block_m, 256, stages)


@pytest.mark.parametrize("tokens,block_m,stages", [(1024, 64, 4), (4096, 64, 4), (128, 128, 3)])
def test_an_overridden_tile_height_brings_its_own_pipeline_depth(tokens, block_m, stages):
    """launch_override={"block_m": 64} gives decode's 64 x 256 tiles with 4 stages whatever the
    rows, and 128 the tall tiles' 3; a stages override still wins."""
    geo = geometry(tokens=4096)
    launch = choose_launch(geo, tokens, torch.bfloat16, SMS, {"block_m": block_m})
    assert (launch.block_m, launch.stages) == (block_m, stages)
    assert choose_launch(geo, tokens, torch.bfloat16, SMS, {"block_m": block_m, "stages": 2}).stages == 2


def test_fp32_keeps_small_tiles():
    for tokens in (128, 16384):
        launch = choose_launch(geometry(tokens=tokens), tokens, torch.float32, SMS)
        assert (launch.block_m, launch.block_n, launch.stages) == (64, 128, 2)


@pytest.mark.parametrize("name,world,split", [("qwen3_30b_a3b", 2, True), ("deepseek_v3", 4, True),
                                              ("mixtral_8x7b", 2, False), ("qwen3_30b_a3b", 1, False)])
def test_half_the_programs_dispatch_for_experts_narrower_than_hidden(name, world, split):
    """... on several ranks: one rank has nothing to dispatch (its tiles read x itself)."""
    launch = choose_launch(geometry(name, world, tokens=16384), 16384, torch.bfloat16, SMS)
    assert launch.programs == SMS and launch.dispatch_programs == (SMS // 2 if split else SMS)
    more = choose_launch(geometry(name, world, tokens=16384), 16384, torch.bfloat16, SMS, {"programs": 2 * SMS})
    assert more.dispatch_programs == (SMS if split else 2 * SMS)  # half of the programs asked for


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name,world,max_tokens,top_k", [("qwen3_30b_a3b", 1, 4096, 8), ("qwen3_30b_a3b", 2, 300, 8),
                                                         ("qwen3_30b_a3b", 1, 3000, 3), ("mixtral_8x7b", 4, 2048, 2),
                                                         ("deepseek_v3", 8, 1000, 8), ("tiny", 2, 7, 2),
                                                         ("mixtral_8x7b", 1, 4500, 1), ("llama4_scout", 1, 7000, 1)])
def test_launch_variants_are_every_launch_a_token_count_can_get(dtype, name, world, max_tokens, top_k):
    """What a layer on several GPUs compiles when it is built (FlashBackend.compile_variants):
    every launch of 0..max_tokens tokens, each once, and none that no token count gets (top-3 of
    128 experts: the rows an expert reach a threshold between two token counts' worth; mixtral at
    top-1: the slots a call reach the sorted rows' threshold well after its rows do; llama4_scout's
    16 experts at top-1: the rows, after the slots)."""
    geo = geometry(name, world, tokens=max_tokens, top_k=top_k)
    every = {choose_launch(geo, t, dtype, SMS) for t in range(max_tokens + 1)}
    variants = launch_variants(geo, dtype, SMS)
    assert len(variants) == len(set(variants)) and set(variants) == every


@pytest.mark.parametrize("world,tokens,span", [(1, 4096, 4), (1, 16384, 4), (1, 4095, 2), (1, 2048, 2),
                                               (1, 2047, 1), (1, 128, 1), (2, 4096, 1)])
def test_combine_tasks_take_several_column_tiles_at_world_1_with_many_tokens(world, tokens, span):
    """qwen3 (128 rows an expert from 2,048 tokens): two column tiles a task from there, four from
    4,096 tokens (where four were measured). Several ranks keep a task per column tile (measured
    at world 1 only); so does decode, where fewer combine tasks would leave programs idle."""
    launch = choose_launch(geometry("qwen3_30b_a3b", world, tokens=tokens), tokens, torch.bfloat16, SMS)
    assert launch.combine_span == span


@pytest.mark.parametrize("dtype,top_k", [(torch.float32, 8), (torch.bfloat16, 3)])
def test_combine_tasks_keep_one_column_tile_in_fp32_or_below_128_rows_an_expert(dtype, top_k):
    """Many tokens alone do not widen the combine tasks: fp32 layers keep one column tile a task,
    and so do bf16 calls whose experts average under 128 rows (qwen3 at top-3: 96 at 4,096 tokens)."""
    launch = choose_launch(geometry("qwen3_30b_a3b", 1, tokens=4096, top_k=top_k), 4096, dtype, SMS)
    assert launch.combine_span == 1


@pytest.mark.parametrize("world,tokens,static", [(1, 1024, 1), (1, 16384, 1), (1, 1023, 0), (1, 128, 0),
                                                  (2, 4096, 0)])
def test_gemm1_tiles_take_a_static_order_at_world_1_from_64_rows_an_expert(world, tokens, static):
    """qwen3: tokens / 16 rows per expert at world 1. Decode keeps the queue (no difference
    measured there); several ranks must (their GEMM1 tiles wait for other ranks' rows)."""
    launch = choose_launch(geometry("qwen3_30b_a3b", world, tokens=tokens), tokens, torch.bfloat16, SMS)
    assert launch.static_ffn_in == static
    assert choose_launch(geometry("qwen3_30b_a3b", world, tokens=tokens), tokens, torch.bfloat16, SMS,
                         {"static_ffn_in": 0}).static_ffn_in == 0


@pytest.mark.parametrize("preset,world,h_tma", [("mixtral_8x7b", 1, 1), ("gpt_oss_120b", 1, 0),
                                                 ("qwen3_30b_a3b", 1, 0), ("mixtral_8x7b", 2, 0)])
def test_gemm2_rows_come_through_tma_at_world_1_for_experts_twice_as_wide_as_hidden(preset, world, h_tma):
    """Measured faster for mixtral (ffn 3.5x hidden) only; several ranks cannot (a tile's rows come
    from several sources)."""
    geo = geometry(preset, world, tokens=4096)
    assert choose_launch(geo, 4096, torch.bfloat16, SMS).h_tma == h_tma
    assert choose_launch(geo, 4096, torch.float32, SMS).h_tma == 0  # measured in bf16 only


@pytest.mark.parametrize("preset,world,tokens,changes,sorted_rows", [
    ("mixtral_8x7b", 1, 4096, {}, 1), ("mixtral_8x7b", 1, 2048, {}, 1), ("mixtral_8x7b", 1, 2047, {}, 0),
    ("mixtral_8x7b", 1, 1024, {}, 0), ("mixtral_8x7b", 1, 2048, {"num_experts": 64}, 0),
    ("mixtral_8x7b", 1, 6144, {"top_k": 1, "num_experts": 16}, 1),
    ("mixtral_8x7b", 1, 6143, {"top_k": 1, "num_experts": 16}, 0),
    ("mixtral_8x7b", 1, 4096, {"top_k": 1, "num_experts": 16}, 0),
    ("mixtral_8x7b", 1, 2048, {"top_k": 1, "num_experts": 4}, 0),
    ("mixtral_8x7b", 2, 4096, {}, 0), ("gpt_oss_120b", 1, 16384, {}, 0), ("qwen3_30b_a3b", 1, 16384, {}, 0),
    ("mixtral_8x7b", 1, 4096, {"ffn_size": 4096}, 1), ("mixtral_8x7b", 1, 4096, {"ffn_size": 3968}, 0),
    ("mixtral_8x7b", 1, 4096, {"ffn_size": 4096, "activation": "gelu"}, 0),
    ("mixtral_8x7b", 1, 4096, {"ffn_size": 8192, "activation": "relu"}, 1)])
def test_gemm1_rows_are_copied_into_expert_order_at_world_1_from_384_rows_8192_columns_and_4096_slots(
        preset, world, tokens, changes, sorted_rows):
    """Measured faster for mixtral (gated, ffn 14,336) and a 5,888-wide random shape, slower for
    gpt_oss (2,880) and qwen3 (768): the copy costs ~400 / GEMM1's columns (2F gated, F not) of
    GEMM1's time, which the TMA loop gains back from ~8,192 columns. From 384 rows an expert
    and 4,096 slots (tokens x top-k) a call, as measured: mixtral's 8 experts at top-2 reach both
    at 2,048 tokens (at 1,024, 256 rows an expert are not enough); 64 experts have 4,096 slots
    there but 64 rows an expert; 16 experts at top-1 have 4,096 slots at 4,096 tokens but 256
    rows, and reach 384 at 6,144; 4 experts at top-1 have 512 rows at 2,048 tokens but 2,048
    slots. Several ranks cannot (their rows arrive from other sources)."""
    geo = geometry(preset, world, tokens=tokens, **changes)
    assert choose_launch(geo, tokens, torch.bfloat16, SMS).sorted_rows == sorted_rows
    assert choose_launch(geo, tokens, torch.float32, SMS).sorted_rows == 0  # measured in bf16 only


@pytest.mark.parametrize("world,changes,direct", [
    (1, {"top_k": 1, "num_experts": 16}, 1), (1, {"top_k": 2}, 0), (2, {"top_k": 1, "num_experts": 16}, 0),
    (1, {"top_k": 1, "num_experts": 16, "shared_experts": 1}, 0)])
def test_top1_gemm2_tiles_write_the_output_at_world_1_without_shared_experts(world, changes, direct):
    """Each token's output is then one weighted expert row, which the GEMM2 tile stores itself:
    measured faster than the combine at 2,048-16,384 tokens in bf16, and taken at any token count
    and in fp32 too (the same store, without the round trip through the combine buffer); an
    override keeps the combine."""
    geo = geometry("mixtral_8x7b", world, tokens=4096, **changes)
    for tokens, dtype in [(1, torch.bfloat16), (4096, torch.bfloat16), (4096, torch.float32)]:
        assert choose_launch(geo, tokens, dtype, SMS).direct_out == direct
    assert choose_launch(geo, 4096, torch.bfloat16, SMS, {"direct_out": 0}).direct_out == 0


def test_a_gpu_whose_sms_are_shared_keeps_every_tile_on_the_queue():
    """Under CUDA MPS with an SM limit not every program is resident at once, which the static
    order needs (a GEMM2 tile would wait for a program that has no SM)."""
    geo = geometry(tokens=4096)
    assert choose_launch(geo, 4096, torch.bfloat16, SMS, resident=False).static_ffn_in == 0
    assert not sms_limited_by_mps({})
    assert not sms_limited_by_mps({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"})
    assert sms_limited_by_mps({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"})


def test_overrides_fix_settings_and_are_checked():
    geo = geometry(tokens=4096)
    launch = choose_launch(geo, 4096, torch.bfloat16, SMS, {"block_m": 64, "num_warps": 4, "stages": 4})
    assert (launch.block_m, launch.block_n, launch.num_warps, launch.stages) == (64, 256, 4, 4)
    with pytest.raises(ValueError, match=r"launch override \['blockm'\]"):
        choose_launch(geo, 4096, torch.bfloat16, SMS, {"blockm": 64})
    with pytest.raises(ValueError, match="block_n=192"):
        choose_launch(geo, 4096, torch.bfloat16, SMS, {"block_n": 192})
    with pytest.raises(ValueError, match="block_m=96"):
        choose_launch(geo, 4096, torch.bfloat16, SMS, {"block_m": 96})
    with pytest.raises(ValueError, match="dispatch_programs=200"):
        choose_launch(geo, 4096, torch.bfloat16, SMS, {"dispatch_programs": 200})
    two_a_sm = choose_launch(geo, 4096, torch.bfloat16, SMS, {"programs": 2 * SMS})
    assert (two_a_sm.programs, two_a_sm.dispatch_programs, two_a_sm.static_ffn_in) == (2 * SMS, 2 * SMS, 0)
    asked = choose_launch(geo, 4096, torch.bfloat16, SMS, {"programs": 2 * SMS, "static_ffn_in": 1})
    assert asked.static_ffn_in == 1 and choose_launch(geo, 4096, torch.bfloat16, SMS).static_ffn_in == 1
    for bad in (0, "264"):
        with pytest.raises(ValueError, match=r"LaunchConfig\.programs="):
            choose_launch(geo, 4096, torch.bfloat16, SMS, {"programs": bad})


@pytest.mark.parametrize("field", [f for f in FIELDS if f not in SWITCHES])
def test_launch_settings_must_be_positive_ints(field):
    fields = dict(programs=4, block_m=64, block_n=128)
    with pytest.raises(ValueError, match=field):
        LaunchConfig(**{**fields, field: 0})


@pytest.mark.parametrize("field", SWITCHES)
@pytest.mark.parametrize("value", [2, -1, True, 1.0])
def test_the_switches_are_0_or_1(field, value):
    with pytest.raises(ValueError, match=field):
        LaunchConfig(programs=4, block_m=64, block_n=128, **{field: value})


def test_the_chooser_is_a_pure_function_of_its_inputs():
    geo = geometry(tokens=8192)
    assert choose_launch(geo, 8192, torch.bfloat16, SMS) == choose_launch(geo, 8192, torch.bfloat16, SMS)
    assert Geometry.for_config(MoEConfig(64, 64, 4, 2), 2, 10).local_experts == 2
