"""Scalar arguments -- attention's scale and causal_offset, the diffusion ops' timestep t,
truncation_rate and guidance_scale, the models' sampling numbers -- take numpy scalars (and 0-d
arrays) in the torch API exactly as in the numpy front end (one check, _frontend/common.py), with
the results of the plain Python numbers; anything else is a TypeError naming the argument."""
import warnings

import numpy as np
import pytest
import torch

import imgtx_fast
import imgtx_fast.nn.functional as nn_functional
from imgtx_fast import numpy as itx
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_log_probs, posterior_sample, q_sample
from imgtx_fast.ops.fused_attention import attention_op
from imgtx_fast.reference import attention as reference

REALS = [np.float32(0.3), np.float64(0.3), np.float16(0.3), np.array(0.3, dtype=np.float32),
         torch.tensor(0.3)]
INTS = [np.int64(3), np.int32(3), np.uint8(3), np.array(3), torch.tensor(3)]
NOT_REALS = ["0.3", True, np.bool_(True), np.array([0.3]), 1j, np.complex64(0.3), [0.3]]
NOT_INTS = [3.0, np.float32(3), "3", True, np.bool_(True), np.array(3.0)]


def _qkv(gen, B=2, H=3, Nq=7, Nk=11, D=12):
    return [torch.randn(B, H, n, D, generator=gen) for n in (Nq, Nk, Nk)]


@pytest.mark.parametrize("scale", REALS + [np.int64(1)], ids=lambda s: type(s).__name__)
def test_attention_scale_takes_numpy_scalars_in_both_front_ends(scale):
    q, k, v = _qkv(torch.Generator().manual_seed(1))
    s = float(scale)
    want = reference.attention(q.double(), k.double(), v.double(), scale=s, causal=True)
    got = imgtx_fast.attention(q, k, v, scale=scale, causal=True)
    torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(got, imgtx_fast.attention(q, k, v, scale=s, causal=True), atol=0, rtol=0)
    if not isinstance(scale, torch.Tensor):
        got_np = itx.attention(q.numpy(), k.numpy(), v.numpy(), scale=scale, causal=True)
        np.testing.assert_allclose(got_np, want.numpy(), atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("bad", NOT_REALS, ids=repr)
def test_attention_bad_scale_is_one_error_in_both_front_ends(bad):
    q, k, v = _qkv(torch.Generator().manual_seed(2))
    with pytest.raises(TypeError, match="attention: scale must be a float or None") as torch_err:
        imgtx_fast.attention(q, k, v, scale=bad)
    with pytest.raises(TypeError) as numpy_err:
        itx.attention(q.numpy(), k.numpy(), v.numpy(), scale=bad)
    assert str(numpy_err.value) == str(torch_err.value)


@pytest.mark.parametrize("offset", [np.int64(2), np.int32(-3), np.array(2)], ids=repr)
def test_attention_op_causal_offset_takes_numpy_integers(offset):
    q, k, v = _qkv(torch.Generator().manual_seed(3))
    out, lse = attention_op(q, k, v, causal_offset=offset)
    want, want_lse = attention_op(q, k, v, causal_offset=int(offset))
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    with pytest.raises(TypeError, match="causal_offset must be an int"):
        attention_op(q, k, v, causal_offset=np.float64(2))


def test_sdpa_dropin_takes_numpy_scale_on_the_fused_path(monkeypatch):
    monkeypatch.setattr(nn_functional, "_warned", set())
    q, k, v = _qkv(torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch's function would warn
        got = nn_functional.scaled_dot_product_attention(q, k, v, scale=np.float32(0.25))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- diffusion

K, T = 6, 9


def _diffusion_inputs(seed=5, B=3, N=13):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, K, N, generator=g).log_softmax(1)
    uncond = torch.randn(B, K, N, generator=g).log_softmax(1)
    x_t = torch.randint(0, K + 1, (B, N), generator=g)
    return logp, uncond, x_t


@pytest.mark.parametrize("t", INTS, ids=lambda t: type(t).__name__)
def test_diffusion_t_takes_numpy_integers_in_both_front_ends(t):
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    logp, uncond, x_t = _diffusion_inputs()
    x0 = x_t.clamp(max=K - 1)

    def gen():
        return torch.Generator().manual_seed(7)

    assert torch.equal(q_sample(x0, t, sched, gen()), q_sample(x0, 3, sched, gen()))
    assert torch.equal(posterior_sample(logp, x_t, t, sched, gen()),
                       posterior_sample(logp, x_t, 3, sched, gen()))
    torch.testing.assert_close(posterior_log_probs(logp, x_t, t, sched),
                               posterior_log_probs(logp, x_t, 3, sched), atol=0, rtol=0)
    if isinstance(t, torch.Tensor):
        return
    np_sched = itx.MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    np.testing.assert_array_equal(itx.posterior_log_probs(logp.numpy(), x_t.numpy(), t, np_sched),
                                  itx.posterior_log_probs(logp.numpy(), x_t.numpy(), 3, np_sched))
    np.testing.assert_array_equal(itx.q_sample(x0.numpy(), t, np_sched, 123),
                                  itx.q_sample(x0.numpy(), 3, np_sched, 123))


@pytest.mark.parametrize("bad", NOT_INTS, ids=repr)
def test_diffusion_bad_t_is_a_type_error_in_both_front_ends(bad):
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    np_sched = itx.MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    logp, _, x_t = _diffusion_inputs()
    with pytest.raises(TypeError, match="posterior_log_probs: t must be an int"):
        posterior_log_probs(logp, x_t, bad, sched)
    with pytest.raises(TypeError, match="posterior_log_probs: t must be an int"):
        itx.posterior_log_probs(logp.numpy(), x_t.numpy(), bad, np_sched)


def test_diffusion_out_of_range_numpy_t_is_a_value_error():
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    logp, _, x_t = _diffusion_inputs()
    with pytest.raises(ValueError, match=r"t must be in \[0, 9\), got 9"):
        posterior_log_probs(logp, x_t, np.int64(T), sched)


@pytest.mark.parametrize("to_scalar", [np.float32, np.float64, np.array, torch.tensor],
                         ids=["float32", "float64", "0-d array", "0-d tensor"])
def test_truncation_and_guidance_take_numpy_scalars_in_both_front_ends(to_scalar):
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    logp, uncond, x_t = _diffusion_inputs()
    rate, scale = 0.7, 2.5
    kw = dict(truncation_rate=to_scalar(rate), guidance_scale=to_scalar(scale), log_p_x0_uncond=uncond)
    plain = dict(truncation_rate=rate, guidance_scale=float(to_scalar(scale)), log_p_x0_uncond=uncond)
    got = posterior_log_probs(logp, x_t, 4, sched, **kw)
    torch.testing.assert_close(got, posterior_log_probs(logp, x_t, 4, sched, **plain), atol=0, rtol=0)
    g = torch.Generator
    assert torch.equal(posterior_sample(logp, x_t, 4, sched, g().manual_seed(1), **kw),
                       posterior_sample(logp, x_t, 4, sched, g().manual_seed(1), **plain))
    if to_scalar is torch.tensor:
        return
    np_sched = itx.MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    np_kw = dict(kw, log_p_x0_uncond=uncond.numpy())
    np.testing.assert_array_equal(itx.posterior_log_probs(logp.numpy(), x_t.numpy(), 4, np_sched, **np_kw),
                                  got.numpy())


@pytest.mark.parametrize("name", ["truncation_rate", "guidance_scale"])
@pytest.mark.parametrize("bad", ["0.5", np.array([0.5]), 1j], ids=repr)
def test_bad_truncation_or_guidance_names_the_argument(name, bad):
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    np_sched = itx.MaskAndReplaceSchedule(num_classes=K, num_timesteps=T)
    logp, uncond, x_t = _diffusion_inputs()
    kw = {"guidance_scale": 2.0, "log_p_x0_uncond": uncond, name: bad}
    with pytest.raises(TypeError, match=f"posterior_log_probs: {name} must be a float") as torch_err:
        posterior_log_probs(logp, x_t, 4, sched, **kw)
    with pytest.raises(TypeError) as numpy_err:
        itx.posterior_log_probs(logp.numpy(), x_t.numpy(), 4, np_sched,
                                **dict(kw, log_p_x0_uncond=uncond.numpy()))
    assert str(numpy_err.value) == str(torch_err.value)


@pytest.mark.parametrize("make", [MaskAndReplaceSchedule, itx.MaskAndReplaceSchedule],
                         ids=["torch", "numpy"])
def test_schedule_sizes_take_numpy_integers_in_both_front_ends(make):
    got = make(num_classes=np.int64(K), num_timesteps=np.int32(T))
    want = make(num_classes=K, num_timesteps=T)
    assert (got.num_classes, got.num_timesteps) == (K, T) and type(got.num_classes) is int
    np.testing.assert_array_equal(np.asarray(got.table), np.asarray(want.table))
    for bad in (5.0, np.float32(5), True, "5"):
        with pytest.raises(ValueError, match="num_classes must be an int"):
            make(num_classes=bad)


def test_kv_cache_max_length_takes_numpy_integers():
    from imgtx_fast.nn import KVCache

    cache = KVCache(max_length=np.int64(8))
    assert cache.max_length == 8 and type(cache.max_length) is int
    with pytest.raises(ValueError, match="max_length"):
        KVCache(max_length=np.float32(8))


def test_numpy_set_num_threads_takes_numpy_integers():
    before = itx.get_num_threads()
    try:
        itx.set_num_threads(np.int64(1))
        assert itx.get_num_threads() == 1 and type(itx.get_num_threads()) is int
        with pytest.raises(ValueError, match="set_num_threads"):
            itx.set_num_threads(np.float32(1))
    finally:
        itx.set_num_threads(before)


# ----------------------------------------------------------------------------------- models

@pytest.fixture
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_image_transformer_sample_takes_numpy_scalars(one_torch_thread):
    from imgtx_fast.models import ImageTransformer, ImageTransformerConfig

    torch.manual_seed(0)
    model = ImageTransformer(ImageTransformerConfig(height=4, width=5, channels=1, num_classes=0,
                                                    dim=16, heads=2, depth=1, attention="local1d",
                                                    block=4)).eval()

    def run(**kw):
        return model.sample(generator=torch.Generator().manual_seed(3), **kw)

    want = run(batch_size=2, temperature=0.8, prefix_len=0)
    got = run(batch_size=np.int64(2), temperature=np.float32(0.8), prefix_len=np.int64(0))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="temperature"):
        run(batch_size=2, temperature="0.8")
    with pytest.raises(ValueError, match="batch_size"):
        run(batch_size=np.float32(2))


def test_vq_diffusion_sample_takes_numpy_scalars(one_torch_thread):
    from imgtx_fast.models import VQDiffusionConfig, VQDiffusionTransformer

    torch.manual_seed(0)
    model = VQDiffusionTransformer(VQDiffusionConfig(num_codes=5, height=2, width=3, dim=16, depth=1,
                                                     heads=2, num_classes=3, num_timesteps=6)).eval()
    cond = torch.tensor([0, 2])

    def run(**kw):
        return model.sample(cond, generator=torch.Generator().manual_seed(4), **kw)

    want = run(num_steps=3, guidance_scale=1.5, truncation_rate=0.8)
    got = run(num_steps=np.int64(3), guidance_scale=np.float32(1.5), truncation_rate=np.float32(0.8))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="guidance_scale"):
        run(guidance_scale="1.5")
    with pytest.raises(ValueError, match="num_steps"):
        run(num_steps=np.float64(3))


def test_imagen_sample_takes_numpy_scalars(one_torch_thread):
    from imgtx_fast.models import ImagenConfig, ImagenDenoiser

    torch.manual_seed(0)
    model = ImagenDenoiser(ImagenConfig(image_size=4, channels=1, patch_size=2, dim=16, depth=1,
                                        heads=2, text_dim=8, num_timesteps=20)).eval()
    text = torch.randn(2, 3, 8)

    def run(**kw):
        return model.sample(text, generator=torch.Generator().manual_seed(5), **kw)

    want = run(num_steps=4, guidance_scale=2.0, percentile=0.9)
    got = run(num_steps=np.int64(4), guidance_scale=np.float32(2.0), percentile=np.float64(0.9))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_steps"):
        run(num_steps=4.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        run(num_steps=4, guidance_scale=np.array([2.0]))
