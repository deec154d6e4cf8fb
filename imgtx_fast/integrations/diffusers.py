"""Drop-in fused replacements for diffusers' VQ-Diffusion scheduler and pipeline.

    from imgtx_fast.integrations.diffusers import FastVQDiffusionScheduler, fast_pipeline
    pipe.scheduler = FastVQDiffusionScheduler.from_config(pipe.scheduler.config)  # step() is fused
    pipe = fast_pipeline(pipe)      # also fuses guidance + renormalise + truncate + step per step
    pipe = accelerate(pipe)         # in place: fast scheduler + fused attention in the transformer

`FastVQDiffusionScheduler.step` samples the same distribution as `VQDiffusionScheduler.step`
with one pass of `imgtx_fast.diffusion.posterior_sample` instead of several full-size
(B, K+1, N) temporaries; `step_guided` adds classifier-free guidance and top-r truncation to
that pass. The samples are not bit-identical to diffusers' (different random streams and
sampling method), only identically distributed; the same generator seed reproduces ours.

`FastVQDiffusionPipeline` needs `transformers` too, as diffusers' VQDiffusionPipeline does.

`FusedAttnProcessor` runs diffusers' `Attention` modules (UNets, Transformer2DModel, the
VQ-Diffusion transformer, ...) on imgtx_fast's fused attention op:

    model.set_attn_processor(FusedAttnProcessor())   # models that have set_attn_processor
    use_fused_attention(model)                         # any model (e.g. Transformer2DModel)
"""
import operator
import weakref
from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F

try:
    # SchedulerMixin is re-exported on purpose: a saved pipeline records our scheduler under this
    # module's path, and diffusers' loader looks the loadable base classes up in that module.
    from diffusers import SchedulerMixin, VQDiffusionScheduler  # noqa: F401
    from diffusers.schedulers.scheduling_vq_diffusion import VQDiffusionSchedulerOutput
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "imgtx_fast.integrations.diffusers needs the `diffusers` package: "
        "pip install imgtx_fast[diffusers]") from _e

from ..diffusion import MaskAndReplaceSchedule, posterior_sample
from ..nn._masks import key_lengths_from_mask
from ..nn.functional import _why_not_fused, warn_fallback
from ..ops.fused_attention import attention_op

# The pipeline class imports transformers (CLIP); the scheduler does not need it.
_VQDiffusionPipeline = None
_PIPELINE_IMPORT_ERROR: Optional[ImportError] = None
for _path in ("diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion",
              "diffusers.pipelines.vq_diffusion.pipeline_vq_diffusion"):
    try:
        _VQDiffusionPipeline = __import__(_path, fromlist=["VQDiffusionPipeline"]).VQDiffusionPipeline
        break
    except ImportError as _e:  # transformers missing, or another diffusers layout
        _PIPELINE_IMPORT_ERROR = _PIPELINE_IMPORT_ERROR or _e

__all__ = ["FastVQDiffusionScheduler", "FusedAttnProcessor", "accelerate", "fast_pipeline",
           "use_fast_scheduler", "use_fused_attention"]
if _VQDiffusionPipeline is not None:
    __all__.append("FastVQDiffusionPipeline")


def _timestep(timestep):
    """An int or integer tensor as posterior_sample takes it (numpy ints become ints)."""
    if isinstance(timestep, torch.Tensor):
        return timestep
    return operator.index(timestep)


def _log_probs(x):
    """The kernels read float32/16/bf16; diffusers' step also takes float64 (cast, a copy)."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return x.float()
    return x


def _kernels_run_on(x) -> bool:
    """Whether the fused kernels can read x's memory (CPU and CUDA tensors). On other devices
    diffusers' own scheduler works, so the drop-in falls back to it there."""
    return not isinstance(x, torch.Tensor) or x.device.type in ("cpu", "cuda")


def _generator(generator):
    if isinstance(generator, (list, tuple)):
        if len(generator) != 1:
            raise ValueError("FastVQDiffusionScheduler: pass one torch.Generator (all tokens of the "
                             f"batch are sampled in one call), got a list of {len(generator)}")
        generator = generator[0]
    return generator


class FastVQDiffusionScheduler(VQDiffusionScheduler):
    """`VQDiffusionScheduler` whose `step` is one fused kernel call (same config, same API).

    Build it from any VQ-Diffusion scheduler config: ``FastVQDiffusionScheduler.from_config(
    pipe.scheduler.config)``. `model_output` may be any (B, K, N) float32/float16/bfloat16 view
    (e.g. a permuted (B, N, K) buffer): it is read in place, and need not be normalised
    (float64 is accepted too, through a float32 copy). On devices other than CPU and CUDA,
    `step` and `step_guided` run diffusers' own computation instead.

    Config files are interchangeable with the stock class both ways (save_config of one,
    from_pretrained / from_config of the other), and `compatibles` lists both classes.
    """

    _compatibles = ["VQDiffusionScheduler"]

    @classmethod
    def _get_compatibles(cls):
        # diffusers resolves `_compatibles` by name inside its own package, where this class
        # is not found: name both classes directly (the stock one first).
        return [VQDiffusionScheduler, FastVQDiffusionScheduler]

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # diffusers records arguments given positionally as "defaults" (`_use_default_values`),
        # so `from_config` of `VQDiffusionScheduler(4097).config` drops num_vec_classes (and a
        # positional num_train_timesteps would silently revert to 100). The stock and the fast
        # scheduler share one __init__ and its defaults, so take every value the config holds.
        config_dict = {k: v for k, v in dict(config_dict).items() if k != "_use_default_values"}
        return super().extract_init_dict(config_dict, **kwargs)

    @property
    def _imgtx_schedule(self) -> MaskAndReplaceSchedule:
        sched = self.__dict__.get("_imgtx_schedule_cache")
        if sched is None:
            sched = self.__dict__["_imgtx_schedule_cache"] = MaskAndReplaceSchedule.from_diffusers(self)
        return sched

    def step(self, model_output: torch.Tensor, timestep: Union[int, torch.Tensor],
             sample: torch.LongTensor, generator: Optional[torch.Generator] = None,
             return_dict: bool = True):
        """x_{t-1} ~ p(x_{t-1} | x_t), as `VQDiffusionScheduler.step` (at t = 0: x0 ~ model_output)."""
        if not (_kernels_run_on(model_output) and _kernels_run_on(sample)):
            return super().step(model_output, timestep, sample, generator=generator,
                                return_dict=return_dict)
        prev = posterior_sample(_log_probs(model_output), sample, _timestep(timestep),
                                self._imgtx_schedule, _generator(generator))
        return VQDiffusionSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def step_guided(self, model_output_cond: torch.Tensor,
                    model_output_uncond: Optional[torch.Tensor],
                    timestep: Union[int, torch.Tensor], sample: torch.LongTensor, *,
                    guidance_scale: Optional[float], truncation_rate: Optional[float] = 1.0,
                    generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One fused call for VQDiffusionPipeline's whole per-step sequence: classifier-free
        guidance ``u + s (c - u)``, logsumexp renormalisation, `truncate(truncation_rate)`,
        `clamp(-70)` and `step`. As in the pipeline, guidance applies only when
        ``guidance_scale > 1``; otherwise `model_output_uncond` is ignored (it may be None).
        A truncation_rate >= 1 (or None) keeps every class, as in the pipeline; a rate <= 0
        keeps only the most likely class (the lowest index among equal probabilities), which
        is what diffusers' `truncate` does for any rate <= 0."""
        truncation_rate = _pipeline_rate(truncation_rate)
        guided = guidance_scale is not None and guidance_scale > 1.0
        if guided and model_output_uncond is None:
            raise ValueError("step_guided: guidance_scale > 1 needs model_output_uncond")
        if not all(_kernels_run_on(x) for x in (model_output_cond, model_output_uncond, sample)):
            log_p = _stock_sequence(model_output_cond, model_output_uncond if guided else None,
                                    guidance_scale, truncation_rate)
            return super().step(log_p, timestep, sample, generator=generator, return_dict=return_dict)
        kwargs = {"truncation_rate": truncation_rate}
        if guided:
            kwargs.update(guidance_scale=float(guidance_scale),
                          log_p_x0_uncond=_log_probs(model_output_uncond))
        prev = posterior_sample(_log_probs(model_output_cond), sample, _timestep(timestep),
                                self._imgtx_schedule, _generator(generator), **kwargs)
        return VQDiffusionSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


def _pipeline_rate(rate: Optional[float]) -> Optional[float]:
    """VQDiffusionPipeline's truncation_rate as posterior_sample takes it. diffusers keeps a
    class while the cumulative probability before it is < rate, and always the first: every
    rate >= 1 keeps all classes (None here), every rate <= 0 (and NaN) only the first."""
    if rate is None:
        return None
    rate = float(rate)
    if rate >= 1.0:
        return None
    return rate if rate > 0.0 else 0.0


def _stock_sequence(cond, uncond, guidance_scale, truncation_rate):
    """The pipeline's per-step tensor passes in plain torch (for devices the kernels do not
    run on): guidance, renormalisation, truncation (reference.truncate: the same rule), clamp."""
    from ..reference.diffusion import truncate

    x = cond if uncond is None else uncond + guidance_scale * (cond - uncond)
    x = x - torch.logsumexp(x, dim=1, keepdim=True)
    if truncation_rate is not None:
        x = truncate(x.exp(), truncation_rate).log()
    return x.clamp(-70)


def use_fast_scheduler(pipe):
    """Replace `pipe.scheduler` by a FastVQDiffusionScheduler with the same config; returns pipe."""
    if not isinstance(pipe.scheduler, FastVQDiffusionScheduler):
        pipe.scheduler = FastVQDiffusionScheduler.from_config(pipe.scheduler.config)
    return pipe


def _missing_pipeline() -> ImportError:
    return ImportError(
        "FastVQDiffusionPipeline needs diffusers' VQDiffusionPipeline, which needs `transformers`: "
        f"pip install imgtx_fast[diffusers] ({_PIPELINE_IMPORT_ERROR})")


def fast_pipeline(pipe) -> "FastVQDiffusionPipeline":
    """A FastVQDiffusionPipeline sharing `pipe`'s components (its scheduler made fast)."""
    if _VQDiffusionPipeline is None:
        raise _missing_pipeline()
    fast = FastVQDiffusionPipeline(**pipe.components)
    if hasattr(pipe, "_progress_bar_config"):
        fast.set_progress_bar_config(**pipe._progress_bar_config)
    return fast


if _VQDiffusionPipeline is not None:
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    class FastVQDiffusionPipeline(_VQDiffusionPipeline):
        """`VQDiffusionPipeline` whose denoising loop makes one fused `step_guided` call per step
        instead of guidance, renormalisation, truncation, clamp and `step` as separate passes.
        A plain VQDiffusionScheduler is converted to FastVQDiffusionScheduler (same config)."""

        def __init__(self, vqvae, text_encoder, tokenizer, transformer, scheduler,
                     learned_classifier_free_sampling_embeddings):
            if not isinstance(scheduler, FastVQDiffusionScheduler):
                scheduler = FastVQDiffusionScheduler.from_config(scheduler.config)
            super().__init__(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer, scheduler=scheduler,
                             learned_classifier_free_sampling_embeddings=learned_classifier_free_sampling_embeddings)

        @torch.no_grad()
        def __call__(
            self,
            prompt: Union[str, List[str]],
            num_inference_steps: int = 100,
            guidance_scale: float = 5.0,
            truncation_rate: float = 1.0,
            num_images_per_prompt: int = 1,
            generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
            latents: Optional[torch.Tensor] = None,
            output_type: Optional[str] = "pil",
            return_dict: bool = True,
            callback: Optional[Callable[[int, int, torch.Tensor], None]] = None,
            callback_steps: int = 1,
        ):
            """As `VQDiffusionPipeline.__call__` (same arguments and outputs)."""
            if isinstance(prompt, str):
                batch_size = 1
            elif isinstance(prompt, list):
                batch_size = len(prompt)
            else:
                raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
            batch_size = batch_size * num_images_per_prompt
            do_classifier_free_guidance = guidance_scale > 1.0
            prompt_embeds = self._encode_prompt(prompt, num_images_per_prompt, do_classifier_free_guidance)

            if callback_steps is None or not isinstance(callback_steps, int) or callback_steps <= 0:
                raise ValueError(f"`callback_steps` has to be a positive integer but is {callback_steps} of type"
                                 f" {type(callback_steps)}.")

            latents_shape = (batch_size, self.transformer.num_latent_pixels)
            if latents is None:
                mask_class = self.transformer.config.num_vector_embeds - 1
                latents = torch.full(latents_shape, mask_class).to(self.device)
            else:
                if latents.shape != latents_shape:
                    raise ValueError(f"Unexpected latents shape, got {latents.shape}, expected {latents_shape}")
                if (latents < 0).any() or (latents >= self.transformer.config.num_vector_embeds).any():
                    raise ValueError(
                        "Unexpected latents value(s). All latents be valid embedding indices i.e. in the range 0,"
                        f" {self.transformer.config.num_vector_embeds - 1} (inclusive).")
                latents = latents.to(self.device)

            use_fast_scheduler(self)  # in case the scheduler was swapped after construction
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            timesteps_tensor = self.scheduler.timesteps.to(self.device)
            sample = latents

            for i, t in enumerate(self.progress_bar(timesteps_tensor)):
                latent_model_input = torch.cat([sample] * 2) if do_classifier_free_guidance else sample
                # model_output == log p(x0 | x_t), (B, K, N)
                model_output = self.transformer(latent_model_input, encoder_hidden_states=prompt_embeds,
                                                timestep=t).sample
                if do_classifier_free_guidance:
                    model_output_uncond, model_output_text = model_output.chunk(2)
                else:
                    model_output_uncond, model_output_text = None, model_output
                # guidance + renormalise + truncate + clamp + step, fused
                sample = self.scheduler.step_guided(
                    model_output_text, model_output_uncond, t, sample, guidance_scale=guidance_scale,
                    truncation_rate=truncation_rate, generator=generator).prev_sample

                if callback is not None and i % callback_steps == 0:
                    callback(i, t, sample)

            embedding_channels = self.vqvae.config.vq_embed_dim
            embeddings_shape = (batch_size, self.transformer.height, self.transformer.width, embedding_channels)
            embeddings = self.vqvae.quantize.get_codebook_entry(sample, shape=embeddings_shape)
            image = self.vqvae.decode(embeddings, force_not_quantize=True).sample

            image = (image / 2 + 0.5).clamp(0, 1)
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
            if not return_dict:
                return (image,)
            return ImagePipelineOutput(images=image)

else:  # pragma: no cover - depends on the environment

    def __getattr__(name):
        if name == "FastVQDiffusionPipeline":
            raise _missing_pipeline()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FusedAttnProcessor:
    """Attention processor for diffusers' `Attention` on imgtx_fast's fused attention op.

    Why: diffusers' default `AttnProcessor2_0` calls torch SDPA with the padded-text mask as a
    dense additive (B, heads, Nq, Nk) tensor; the fused op skips padded keys given their count.
    Everything else is `AttnProcessor2_0` step for step: spatial_norm, 4-D (B, C, H, W) input,
    `attn.prepare_attention_mask`, group_norm, norm_cross, norm_q/norm_k, to_out,
    residual_connection, rescale_output_factor.

    Where the kernel cannot run (head dim above 256, as in AutoencoderKL's one-head mid-block at
    512 channels, float64, other devices, ...) the call is AttnProcessor2_0's torch SDPA, with a
    warning once per reason.

    Two deliberate differences:
    - the logits are scaled by `attn.scale`. AttnProcessor2_0 leaves SDPA's 1/sqrt(head_dim),
      which equals attn.scale wherever diffusers makes it the default (scale_qk=True); with
      scale_qk=False diffusers' default is `AttnProcessor`, whose attn.scale (1.0) we follow.
    - mask_to_lengths=True: an attention mask that hides a suffix of the keys, the same for every
      head and query (diffusers' `(1 - mask) * -10000.0` encoder bias for padded prompts, or a
      bool mask), is passed as key_lengths (see imgtx_fast.nn._masks). That check reads one
      bool from the device; it is remembered for the same mask tensor (same object, unmodified),
      so a model's layers share it. Pass mask_to_lengths=False to always pass the mask (e.g.
      under torch.compile or CUDA-graph capture).
    """

    def __init__(self, mask_to_lengths: bool = True):
        self.mask_to_lengths = mask_to_lengths
        self._memo = None  # (weakref to the mask passed in, key, key_lengths or None)

    def _key_lengths(self, raw: torch.Tensor, mask: torch.Tensor, key) -> Optional[torch.Tensor]:
        try:
            key = key + (raw._version,)
        except RuntimeError:  # inference tensors have no version counter
            return key_lengths_from_mask(mask)
        memo = self._memo
        if memo is not None and memo[0]() is raw and memo[1] == key:
            return memo[2]
        lengths = key_lengths_from_mask(mask)
        self._memo = (weakref.ref(raw), key, lengths)
        return lengths

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            from diffusers.utils import deprecate
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored. "
                      "Please remove it, as passing it will raise an error in the future. `scale` "
                      "should directly be passed while calling the underlying pipeline component "
                      "i.e., via `cross_attention_kwargs`.")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        key_lengths = stock_mask = None
        if attention_mask is not None:
            raw = attention_mask
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
            stock_mask = attention_mask
            if self.mask_to_lengths:
                key_lengths = self._key_lengths(
                    raw, attention_mask, (tuple(raw.shape), raw.dtype, raw.device, raw.data_ptr(),
                                          sequence_length, batch_size, attn.heads))
                if key_lengths is not None:
                    attention_mask = None

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        reason, warn = _why_not_fused(query, key, value, stock_mask, 0.0, False, attn.scale, False)
        if reason is None:
            # (B, heads, N, head_dim), laid out (B, N, heads, head_dim): the reshape below is free
            hidden_states, _ = attention_op(query, key, value, key_lengths=key_lengths,
                                            attn_mask=attention_mask, scale=attn.scale)
        else:  # AttnProcessor2_0's call, where the kernel cannot run (head dim > 256, float64, ...)
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=stock_mask,
                                                           scale=attn.scale)
            if warn:
                warn_fallback(f"FusedAttnProcessor: {reason}",
                              "torch's scaled_dot_product_attention")
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def use_fused_attention(model, mask_to_lengths: bool = True):
    """Give every diffusers `Attention` module in `model` one shared FusedAttnProcessor (so its
    layers share the padded-prompt check); returns model. For models without
    `set_attn_processor` (Transformer2DModel, VQ-Diffusion's transformer, ...)."""
    from diffusers.models.attention_processor import Attention

    processor = FusedAttnProcessor(mask_to_lengths=mask_to_lengths)
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
    return model


def accelerate(pipe, mask_to_lengths: bool = True):
    """Put imgtx_fast into a diffusers `VQDiffusionPipeline`, in place; returns `pipe`.

        pipe = VQDiffusionPipeline.from_pretrained("microsoft/vq-diffusion-ithq")
        pipe = accelerate(pipe)
        images = pipe("a teddy bear", generator=torch.Generator().manual_seed(0)).images

    - `pipe.scheduler` becomes a FastVQDiffusionScheduler with the same config (its `step` is
      one fused kernel call);
    - every diffusers `Attention` of `pipe.transformer` (self- and cross-attention of each
      block) gets one shared FusedAttnProcessor.

    Nothing else changes: the text encoder (a transformers CLIPTextModel, run once per prompt,
    not per step, and built on transformers' own attention) and the VQ-VAE decoder keep their
    code, and the pipeline's `__call__` and outputs are diffusers'. Samples follow the same
    distribution as before, not the same bits (different random streams). For the per-step
    guidance + truncation fused into the step as well, use `fast_pipeline(pipe)` (a new
    FastVQDiffusionPipeline); `accelerate` works on that one too.
    """
    for name in ("scheduler", "transformer"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"accelerate: expected a diffusers VQDiffusionPipeline (with `scheduler` "
                            f"and `transformer`), got {type(pipe).__name__} without `{name}`")
    if not isinstance(pipe.scheduler, VQDiffusionScheduler):
        raise TypeError("accelerate: pipe.scheduler must be a VQDiffusionScheduler (the fast one "
                        f"replaces it with the same config), got {type(pipe.scheduler).__name__}")
    use_fast_scheduler(pipe)
    use_fused_attention(pipe.transformer, mask_to_lengths=mask_to_lengths)
    return pipe
