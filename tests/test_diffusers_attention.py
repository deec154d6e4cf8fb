"""FusedAttnProcessor against diffusers' own attention processors (float32, CPU).

Each diffusers `Attention` feature the processor reproduces (spatial/group/cross norms, 4-D
input, qk norms, masks, residual, rescale) is compared with `AttnProcessor2_0` on a small
randomly initialised module, then whole models (Transformer2DModel with cross attention and an
encoder attention mask, a tiny UNet2DConditionModel). A spy on the fused op checks that padded
prompts reach it as key_lengths.
"""
import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
)

import imgtx_fast.integrations.diffusers as integration  # noqa: E402
from imgtx_fast.integrations.diffusers import FusedAttnProcessor, use_fused_attention  # noqa: E402

ATOL = RTOL = 2e-5
B = 3
LENGTHS = [6, 2, 4]  # prompt lengths of the batch, padded to 6 tokens


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of each fused call and each mask conversion."""
    record = {"op": [], "conversions": 0}
    real_op, real_convert = integration.attention_op, integration.key_lengths_from_mask

    def op(*args, **kwargs):
        record["op"].append(kwargs)
        return real_op(*args, **kwargs)

    def convert(mask):
        record["conversions"] += 1
        return real_convert(mask)

    monkeypatch.setattr(integration, "attention_op", op)
    monkeypatch.setattr(integration, "key_lengths_from_mask", convert)
    return record


def prompt_mask(lengths=LENGTHS, S=6):
    """diffusers' encoder_attention_mask: 1 for tokens, 0 for padding, (B, S)."""
    return (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).float()


def bias(mask):
    """What diffusers' models make of it before the attention: (B, 1, S) additive."""
    return ((1 - mask) * -10000.0).unsqueeze(1)


def pair(seed=0, **kwargs):
    """(Attention with diffusers' processor, deep copy with ours)."""
    torch.manual_seed(seed)
    theirs = Attention(**kwargs).eval()
    ours = copy.deepcopy(theirs)
    ours.set_processor(FusedAttnProcessor())
    return theirs, ours


def g(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CASES = {  # name: (Attention kwargs, call kwargs builder, key_lengths expected)
    "self": (dict(query_dim=16, heads=2, dim_head=8),
             lambda: dict(hidden_states=g(B, 10, 16)), None),
    "cross_padded_prompt": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, bias=True),
                            lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2),
                                         attention_mask=bias(prompt_mask())), LENGTHS),
    "cross_bool_mask": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
                        lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2),
                                     attention_mask=prompt_mask().bool()[:, None, :]), LENGTHS),
    "cross_mask_2d_input": (dict(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4),
                            lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2),
                                         attention_mask=(1 - prompt_mask()) * -10000.0), LENGTHS),
    # a batch whose prompt is all padding: -10000 everywhere leaves the softmax as it is
    "cross_empty_prompt": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
                           lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2),
                                        attention_mask=bias(prompt_mask([6, 0, 3]))), None),
    "self_random_mask": (dict(query_dim=16, heads=2, dim_head=8),
                         lambda: dict(hidden_states=g(B, 10, 16), attention_mask=g(B, 10, 10, seed=3)), None),
    "cross_holes_mask": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8),
                         lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2),
                                      attention_mask=bias(1 - prompt_mask([1, 2, 3]))), None),
    "4d_group_norm_residual": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, bias=True,
                                    residual_connection=True, rescale_output_factor=2.0),
                               lambda: dict(hidden_states=g(B, 16, 3, 5)), None),
    "spatial_norm": (dict(query_dim=32, heads=2, dim_head=8, spatial_norm_dim=4),  # GroupNorm(32)
                     lambda: dict(hidden_states=g(B, 32, 4, 6), temb=g(B, 4, 2, 3, seed=4)), None),
    "norm_cross_layer": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8,
                              cross_attention_norm="layer_norm"),
                         lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2)), None),
    "norm_cross_group": (dict(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8,
                              cross_attention_norm="group_norm", cross_attention_norm_num_groups=4),
                         lambda: dict(hidden_states=g(B, 10, 16), encoder_hidden_states=g(B, 6, 12, seed=2)), None),
    "qk_norm": (dict(query_dim=16, heads=2, dim_head=8, qk_norm="layer_norm"),
                lambda: dict(hidden_states=g(B, 10, 16)), None),
    "out_dim": (dict(query_dim=16, heads=2, dim_head=8, out_dim=24),
                lambda: dict(hidden_states=g(B, 10, 16)), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attention_module_matches_attn_processor_2_0(case, spy):
    kwargs, call, lengths = CASES[case]
    theirs, ours = pair(**kwargs)
    assert isinstance(theirs.processor, AttnProcessor2_0)
    # the layers must do something: perturb the norms' affine parameters from their init
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(g(*p.shape, seed=5) * 0.3)
    ours.load_state_dict(theirs.state_dict())
    inputs = call()
    with torch.no_grad():
        expected = theirs(**inputs)
        out = ours(**inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    (call_kwargs,) = spy["op"]
    assert call_kwargs["scale"] == theirs.scale
    if lengths is None:
        assert call_kwargs["key_lengths"] is None
        assert (call_kwargs["attn_mask"] is None) == ("attention_mask" not in inputs)
    else:
        assert call_kwargs["key_lengths"].tolist() == lengths and call_kwargs["attn_mask"] is None


def test_scale_qk_false_matches_attn_processor():
    """With scale_qk=False diffusers' default is AttnProcessor, scaling by attn.scale = 1."""
    theirs, ours = pair(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, scale_qk=False)
    assert isinstance(theirs.processor, AttnProcessor) and theirs.scale == 1.0
    x, ctx, mask = g(B, 10, 16), g(B, 6, 12, seed=2), bias(prompt_mask())
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx, mask), theirs(x, ctx, mask), atol=ATOL, rtol=RTOL)


def test_mask_to_lengths_off_passes_the_mask(spy):
    theirs, ours = pair(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    ours.set_processor(FusedAttnProcessor(mask_to_lengths=False))
    x, ctx, mask = g(B, 10, 16), g(B, 6, 12, seed=2), bias(prompt_mask())
    with torch.no_grad():
        torch.testing.assert_close(ours(x, ctx, mask), theirs(x, ctx, mask), atol=ATOL, rtol=RTOL)
    assert spy["op"][0]["key_lengths"] is None and spy["op"][0]["attn_mask"] is not None
    assert spy["conversions"] == 0


def test_mask_conversion_is_remembered_until_the_mask_changes(spy):
    theirs, ours = pair(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    x, ctx, mask = g(B, 10, 16), g(B, 6, 12, seed=2), bias(prompt_mask())
    with torch.no_grad():
        ours(x, ctx, mask)
        ours(x * 2, ctx, mask)
        assert spy["conversions"] == 1
        mask[1, 0, :] = bias(prompt_mask([6, 5, 4]))[1, 0, :]  # in place: a new prompt length
        torch.testing.assert_close(ours(x, ctx, mask), theirs(x, ctx, mask), atol=ATOL, rtol=RTOL)
    assert spy["conversions"] == 2
    assert spy["op"][-1]["key_lengths"].tolist() == [6, 5, 4]


def test_transformer2d_cross_attention_with_padded_prompt(spy):
    torch.manual_seed(0)
    theirs = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8,
                                norm_num_groups=4, cross_attention_dim=12, num_layers=2,
                                attention_bias=True).eval()
    ours = use_fused_attention(copy.deepcopy(theirs))
    assert sum(isinstance(m, Attention) and isinstance(m.processor, FusedAttnProcessor)
               for m in ours.modules()) == 4
    x, ctx, mask = g(B, 8, 4, 5), g(B, 6, 12, seed=2), prompt_mask()
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        out = ours(x, encoder_hidden_states=ctx, encoder_attention_mask=mask).sample
        unmasked = theirs(x, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(expected, unmasked, atol=1e-3)  # the mask matters here
    assert len(spy["op"]) == 4  # self + cross attention in each of 2 blocks
    cross = [c for c in spy["op"] if c["key_lengths"] is not None]
    assert len(cross) == 2 and all(c["key_lengths"].tolist() == LENGTHS for c in cross)
    assert spy["conversions"] == 1  # the layers share the conversion of one mask


def test_unet2d_condition_tiny(spy):
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    ours = copy.deepcopy(theirs)
    ours.set_attn_processor(FusedAttnProcessor())
    assert all(isinstance(p, FusedAttnProcessor) for p in ours.attn_processors.values())
    x, ctx, mask = g(B, 4, 8, 8), g(B, 6, 12, seed=2), prompt_mask()
    t = torch.tensor([3, 50, 999])
    with torch.no_grad():
        expected = theirs(x, t, ctx, encoder_attention_mask=mask).sample
        out = ours(x, t, ctx, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert any(c["key_lengths"] is not None and c["key_lengths"].tolist() == LENGTHS
               for c in spy["op"])
