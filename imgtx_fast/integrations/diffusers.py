"""Drop-in fused replacements for diffusers' VQ-Diffusion scheduler and pipeline.

    from imgtx_fast.integrations.diffusers import FastVQDiffusionScheduler, fast_pipeline
    pipe.scheduler = FastVQDiffusionScheduler.from_config(pipe.scheduler.config)  # step() is fused
    pipe = fast_pipeline(pipe)      # also fuses guidance + renormalise + truncate + step per step

`FastVQDiffusionScheduler.step` samples the same distribution as `VQDiffusionScheduler.step`
with one pass of `imgtx_fast.diffusion.posterior_sample` instead of several full-size
(B, K+1, N) temporaries; `step_guided` adds classifier-free guidance and top-r truncation to
that pass. The samples are not bit-identical to diffusers' (different random streams and
sampling method), only identically distributed; the same generator seed reproduces ours.

`FastVQDiffusionPipeline` needs `transformers` too, as diffusers' VQDiffusionPipeline does.
"""
import operator
from typing import Callable, List, Optional, Union

import torch

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

__all__ = ["FastVQDiffusionScheduler", "fast_pipeline", "use_fast_scheduler"]
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
    (float64 is accepted too, through a float32 copy).
    """

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
        A truncation_rate >= 1 (or None) keeps every class, as in the pipeline."""
        if truncation_rate is not None and truncation_rate >= 1.0:
            truncation_rate = None
        kwargs = {"truncation_rate": truncation_rate}
        if guidance_scale is not None and guidance_scale > 1.0:
            if model_output_uncond is None:
                raise ValueError("step_guided: guidance_scale > 1 needs model_output_uncond")
            kwargs.update(guidance_scale=float(guidance_scale),
                          log_p_x0_uncond=_log_probs(model_output_uncond))
        prev = posterior_sample(_log_probs(model_output_cond), sample, _timestep(timestep),
                                self._imgtx_schedule, _generator(generator), **kwargs)
        return VQDiffusionSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


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
