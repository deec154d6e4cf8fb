"""imgtx_fast.integrations.diffusers.accelerate on a tiny in-memory VQDiffusionPipeline.

The pipeline (random VQModel, discrete-input Transformer2DModel, tiny CLIP text model and
tokenizer) is tests/test_diffusers_integration.py's `tiny_pipe`; each test works on a deep copy,
since accelerate changes the pipeline in place. Needs diffusers and transformers.
"""
import copy
import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import VQDiffusionScheduler  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

import imgtx_fast.integrations.diffusers as integration  # noqa: E402
from imgtx_fast.integrations.diffusers import (  # noqa: E402
    FastVQDiffusionScheduler,
    FusedAttnProcessor,
    accelerate,
    fast_pipeline,
)
from test_diffusers_integration import MAX_LEN, PK, SIDE, _check_images, tiny_pipe  # noqa: E402,F401

N_LATENT = SIDE * SIDE


@pytest.fixture
def pipe(tiny_pipe):  # noqa: F811 - the imported fixture
    return copy.deepcopy(tiny_pipe)


def _attention_modules(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.fixture
def spy(monkeypatch):
    """Counts the fused attention op's calls and the fused posterior kernel's calls."""
    calls = {"attention": 0, "posterior": 0}
    real_attn, real_post = integration.attention_op, integration.posterior_sample

    def attn(*a, **k):
        calls["attention"] += 1
        return real_attn(*a, **k)

    def post(*a, **k):
        calls["posterior"] += 1
        return real_post(*a, **k)

    monkeypatch.setattr(integration, "attention_op", attn)
    monkeypatch.setattr(integration, "posterior_sample", post)
    return calls


def test_accelerate_installs_fast_scheduler_and_processors(pipe):
    config = dict(pipe.scheduler.config)
    text_encoder, vqvae, transformer = pipe.text_encoder, pipe.vqvae, pipe.transformer
    stock_processors = [type(m.processor) for m in _attention_modules(transformer)]
    assert stock_processors and FusedAttnProcessor not in stock_processors

    out = accelerate(pipe)
    assert out is pipe  # in place: the user's pipeline object, unchanged otherwise
    assert type(pipe).__name__ == "VQDiffusionPipeline"
    assert isinstance(pipe.scheduler, FastVQDiffusionScheduler)
    fast_config = dict(pipe.scheduler.config)
    for key in ("num_vec_classes", "num_train_timesteps", "alpha_cum_start", "alpha_cum_end",
                "gamma_cum_start", "gamma_cum_end"):
        assert fast_config[key] == config[key], key
    assert pipe.components["scheduler"] is pipe.scheduler  # registered, so save_pretrained sees it
    # every attention of the transformer: self + cross attention per block, one shared processor
    mods = _attention_modules(pipe.transformer)
    assert len(mods) == 2 * pipe.transformer.config.num_layers
    processors = {id(m.processor) for m in mods}
    assert len(processors) == 1 and isinstance(mods[0].processor, FusedAttnProcessor)
    # the rest is the user's, untouched
    assert pipe.text_encoder is text_encoder and pipe.vqvae is vqvae and pipe.transformer is transformer

    # idempotent: a second call keeps the same scheduler object
    scheduler = pipe.scheduler
    assert accelerate(pipe) is pipe and pipe.scheduler is scheduler


def test_accelerated_pipeline_runs_on_our_kernels(pipe, spy):
    accelerate(pipe)

    def run(seed):
        seen = []
        out = pipe("low newer", num_inference_steps=4, guidance_scale=3.0, truncation_rate=0.8,
                   output_type="np", generator=torch.Generator().manual_seed(seed),
                   callback=lambda i, t, s: seen.append(s.clone()))
        return out.images, seen

    images, seen = run(0)
    _check_images(images, 1)
    assert len(seen) == 4 and all(s.shape == (1, N_LATENT) for s in seen)
    assert int(seen[-1].min()) >= 0 and int(seen[-1].max()) < PK  # x0: codes only, no MASK left
    # each step: one guided transformer call (2 rows) = 2 attentions per block, one fused step
    layers = pipe.transformer.config.num_layers
    assert spy["attention"] == 4 * 2 * layers and spy["posterior"] == 4
    images2, seen2 = run(0)
    np.testing.assert_array_equal(images, images2)  # fixed generator: the same images
    assert all(torch.equal(a, b) for a, b in zip(seen, seen2))

    # batch of prompts, no guidance, tuple output
    (images,) = pipe(["low", "newer", "wider"], num_inference_steps=3, guidance_scale=1.0,
                     output_type="np", return_dict=False, generator=torch.Generator().manual_seed(1))
    _check_images(images, 3)


@pytest.mark.parametrize("batch", [1, 3])
def test_transformer_output_equals_default_processor(pipe, batch):
    stock = copy.deepcopy(pipe.transformer).eval()
    assert not any(isinstance(m.processor, FusedAttnProcessor) for m in _attention_modules(stock))
    accelerate(pipe)
    ours = pipe.transformer.eval()
    g = torch.Generator().manual_seed(batch)
    latents = torch.randint(0, PK + 1, (batch, N_LATENT), generator=g)  # codes and MASK (= PK)
    latents[:, ::3] = PK
    context = torch.randn(batch, MAX_LEN, pipe.transformer.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for t in (0, 5, 9):
            expected = stock(latents, encoder_hidden_states=context, timestep=torch.tensor(t)).sample
            got = ours(latents, encoder_hidden_states=context, timestep=torch.tensor(t)).sample
            assert got.shape == (batch, PK, N_LATENT)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    # the comparison is sensitive: another context (keys are a set: a permutation would not do)
    with torch.no_grad():
        other = ours(latents, encoder_hidden_states=torch.randn(context.shape, generator=g),
                     timestep=torch.tensor(5)).sample
        same_t = stock(latents, encoder_hidden_states=context, timestep=torch.tensor(5)).sample
    assert not torch.allclose(other, same_t, atol=1e-3)


def test_transformer_output_with_prompt_embeddings(pipe):
    """The transformer's output on the pipeline's own text embeddings (guided batch: prompt +
    learned null embedding), ours against diffusers' processor."""
    stock = copy.deepcopy(pipe.transformer).eval()
    accelerate(pipe)
    with torch.no_grad():
        embeds = pipe._encode_prompt(["low", "newer"], 1, True)
        latents = torch.full((embeds.shape[0], N_LATENT), PK)
        latents[:, :7] = torch.arange(7) % PK
        expected = stock(latents, encoder_hidden_states=embeds, timestep=torch.tensor(3)).sample
        got = pipe.transformer(latents, encoder_hidden_states=embeds, timestep=torch.tensor(3)).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def test_accelerate_fast_pipeline_too(pipe):
    fast = accelerate(fast_pipeline(pipe))
    assert isinstance(fast.scheduler, FastVQDiffusionScheduler)
    assert all(isinstance(m.processor, FusedAttnProcessor) for m in _attention_modules(fast.transformer))
    out = fast("low", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    _check_images(out.images, 1)


def test_accelerate_rejects_other_objects(pipe):
    with pytest.raises(TypeError, match="VQDiffusionPipeline"):
        accelerate(object())
    not_vq = types.SimpleNamespace(scheduler=object(), transformer=pipe.transformer)
    with pytest.raises(TypeError, match="VQDiffusionScheduler"):
        accelerate(not_vq)
    # nothing was changed before the error
    assert not any(isinstance(m.processor, FusedAttnProcessor) for m in _attention_modules(pipe.transformer))
    assert type(pipe.scheduler) is VQDiffusionScheduler
