"""The CPU forward's query tiles, checked against the float64 oracle with 1 and 2 threads.

Tall tiles: dense inputs with at least 4 tasks per thread run with tiles of 256 query rows or
more (subtiles of 32 sharing each packed key block), others with 128; odd lengths leave a short
last tile and a partial last subtile.
Live lanes: a subtile of 16 or fewer queries (more than the 4 of the decode path) computes only
its first vectors of lanes; short sequences and the last rows of a tile take that path."""
import pytest
import torch

from attention_helpers import gen_for, make_mask, make_qkv, run_forward


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("B,H,Nq,Nk,D,Dv", [(2, 4, 300, 300, 64, 64), (1, 8, 513, 257, 40, 24),
                                          (4, 2, 257, 600, 17, 33), (1, 16, 260, 130, 128, 128)])
@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "key_lengths"])
def test_tall_tiles_match_oracle(threads, B, H, Nq, Nk, D, Dv, variant):
    gen = gen_for(B, H, Nq, Nk, D, Dv, variant, threads)
    q, k, v = make_qkv(B, H, H, Nq, Nk, D, Dv, gen=gen)
    kw = {}
    if variant == "causal":
        kw["causal"] = True
    elif variant == "bool_mask":
        kw["attn_mask"] = make_mask("bool", (B, 1, Nq, Nk), gen)
    elif variant == "key_lengths":
        kw["key_lengths"] = torch.randint(0, Nk + 1, (B,), generator=gen)
    run_forward(q, k, v, **kw)


def test_tall_tiles_gqa_fp16(threads):
    gen = gen_for("gqa", threads)
    q, k, v = make_qkv(2, 8, 2, 289, 311, 48, dtype=torch.float16, gen=gen)
    run_forward(q, k, v, causal=True)


@pytest.mark.parametrize("Nq,Nk", [(5, 7), (8, 8), (16, 16), (16, 77), (17, 33), (9, 300),
                                   (48, 48), (40, 129)])
@pytest.mark.parametrize("variant", ["plain", "causal", "bool_mask", "additive_mask",
                                     "key_lengths"])
def test_live_lanes_match_oracle(threads, Nq, Nk, variant):
    B, H, D, Dv = 3, 4, 64, 40
    gen = gen_for("live", Nq, Nk, variant, threads)
    q, k, v = make_qkv(B, H, H, Nq, Nk, D, Dv, gen=gen)
    kw = {}
    if variant == "causal":
        kw["causal"] = True
    elif variant in ("bool_mask", "additive_mask"):
        kind = "bool" if variant == "bool_mask" else "add_f32"
        kw["attn_mask"] = make_mask(kind, (B, H, Nq, Nk), gen)
    elif variant == "key_lengths":
        kw["key_lengths"] = torch.randint(0, Nk + 1, (B,), generator=gen)
    run_forward(q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_live_lanes_gqa_half(threads, dtype):
    gen = gen_for("live_gqa", dtype, threads)
    q, k, v = make_qkv(2, 8, 2, 12, 21, 48, dtype=dtype, gen=gen)
    run_forward(q, k, v, causal=True)
