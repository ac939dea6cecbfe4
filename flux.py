"""FLUX as a velocity function: the one file that knows diffusers' FLUX layout.

The sampler (`tree_sampler.py`) and the objective (`tmpo.py`) see a flow model only as
`velocity_fn(x, t, cond) -> v`, with the state x kept in fp32. This file turns diffusers'
`FluxPipeline` into that: it loads the pipeline (`load_flux`), adds the paper's LoRA
(`add_lora`, App. D "Backbone": rank 64, alpha 128), encodes prompts once per step
(`encode_prompts`), builds the velocity function (`make_velocity_fn`), converts the transformer's
packed token layout to the VAE's image layout with FluxPipeline's own helpers (`decode`,
`unpacked_latents` for the LGMD metric of Sec. 5, `image_ids`), gives the sigma grid FluxPipeline
uses (`flux_sigmas`, its own scheduler call with the resolution-dependent shift), and plans the
memory of a training step (`activation_bytes`, `memory_parts`, `memory_plan`, `fsdp_plugin`).
`train.py`, `eval.py` and `benchmarks/` all go through these functions, so a change of diffusers'
layout is fixed here only.

Conventions (EQUATIONS.md, "Notation"): t = sigma in [0, 1], 1 = pure noise, 0 = data. The FLUX
transformer predicts the rectified-flow velocity v = eps - x_0 of Eq. (2) (it is trained with
that target), so the Euler/ODE step x_{n+1} = x_n + (sigma_{n+1} - sigma_n) v of
`tree_sampler.ode_step` is exactly FlowMatchEulerDiscreteScheduler.step; tests/test_flux.py checks
a full sample against `FluxPipeline.__call__`.

Shapes, for an image of H x W pixels, VAE downsampling f = pipe.vae_scale_factor (8 for FLUX),
C = vae latent channels (16 for FLUX):
    VAE latent      (N, C, h, w)            h = H / f, w = W / f
    packed tokens   (N, S, 4C)              S = (h/2) * (w/2): each 2x2 latent patch is one token
    img_ids         (S, 3)                  RoPE position (0, row, column) of each token
    prompt_embeds   (P, L, D)               T5 sequence (L = max_sequence_length, D = 4096)
    pooled_prompt_embeds (P, Dp)            CLIP pooled output (Dp = 768)
    text_ids        (L, 3)                  all zeros: text tokens carry no 2-D position
FLUX.1-dev at 512x512: h = w = 64, S = 1024 tokens of 64 channels (D_latent = 65536).

Try it on the tiny offline model (no downloads):
    python tests/tiny_flux.py /tmp/tiny_flux
    python -c "import flux; p = flux.load_flux('/tmp/tiny_flux'); print(flux.latent_geometry(p, 64, 64))"
Tests:
    python -m pytest -x -q tests/test_flux.py
"""

from __future__ import annotations

import collections
import functools
import os
import re
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel

import tree_sampler

if TYPE_CHECKING:  # only for annotations; diffusers is imported lazily (it is heavy)
    from diffusers import FluxPipeline

# The parts a FluxPipeline folder must have (subfolders next to model_index.json).
FLUX_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")

# LoRA targets of the paper (App. D, "Backbone"): attention Q/K/V/out of the image stream and of
# the context (text) stream, and both feed-forward projections (the GELU up-projection
# `net.0.proj` and the down-projection `net.2`) of the image and context streams.
# peft matches a name when a module path *ends with* it, so in FLUX.1-dev (19 double-stream
# blocks `transformer_blocks.*`, 38 single-stream blocks `single_transformer_blocks.*`):
#   - double blocks: all 12 names below match (12 x 19 = 228 layers);
#   - single blocks: only attn.to_q / to_k / to_v match (3 x 38 = 114 layers). A single block has
#     no to_out (pre_only attention); its MLP `proj_mlp` and the fused output `proj_out` are not in
#     the paper's list and get no LoRA. The same 12 names are the default of diffusers' FLUX LoRA
#     example (examples/dreambooth/train_dreambooth_lora_flux.py). The paper's phrase "all linear
#     projections in each transformer block" would add the single blocks' proj_mlp / proj_out:
#     pass `target_modules` to `add_lora` for that (a bare "proj_out" would also hit the final
#     output layer; peft accepts a regex string such as r".*single_transformer_blocks\.\d+\.proj_out").
FLUX_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",  # image stream attention
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",  # text stream
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # both MLPs

VelocityFn = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model inside a DDP/FSDP/compile wrapper (accelerate's own unwrapping, as
    `accelerator.unwrap_model`); its `.config` says how to call it."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


# ---------------------------------------------------------------------------------------------
# Loading and LoRA
# ---------------------------------------------------------------------------------------------


def load_flux(model: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device="cpu",
              offload_text_encoders: bool = False) -> "FluxPipeline":
    """Load a FluxPipeline from a local folder or a hub id, in `dtype`, on `device`, all frozen.

    `model`: a folder written by `FluxPipeline.save_pretrained` (e.g. a downloaded
    black-forest-labs/FLUX.1-dev, or `tests/tiny_flux.py`'s output), or a hub id "owner/name"
    (needs network access or the hub cache). Every base weight gets requires_grad=False; trainable
    weights come only from `add_lora`.
    offload_text_encoders: keep CLIP and T5 (9.1 GiB in bf16, 40% of the transformer) in CPU memory;
    `encode_prompts` moves them to the device for the encode and back, so rollout and update have
    the GPU to themselves. Costs a copy of the encoders each way per encode (train.py: once per
    step). The transformer and the VAE stay on `device`. (On CPU the move is a no-op; the GPU path
    has not run yet: tests/test_gpu.py checks it.)
    """
    from diffusers import FluxPipeline

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    path = os.path.expanduser(str(model))
    local = os.path.isdir(path)
    missing = [p for p in ("model_index.json",) + FLUX_PARTS if local and not os.path.exists(os.path.join(path, p))]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a complete FluxPipeline folder: missing {', '.join(missing)}. A FluxPipeline folder holds "
            f"model_index.json and the subfolders {', '.join(FLUX_PARTS)} (as written by FluxPipeline.save_pretrained "
            "or downloaded from black-forest-labs/FLUX.1-dev).")
    if os.path.isfile(path):
        raise NotADirectoryError(f"model path {path} is a file; pass the FluxPipeline folder or a hub id")
    if not local and (not re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) or str(model).startswith((".", "~"))):
        raise FileNotFoundError(f"model folder {path} does not exist (and '{model}' is not a hub id of the form owner/name)")
    try:
        pipe = FluxPipeline.from_pretrained(path if local else str(model), dtype=dtype)
    except Exception as err:  # a hub id: re-raised with the two things the user can fix
        if local:
            raise
        raise RuntimeError(f"could not load '{model}': there is no local folder of that name, and loading it as a hub "
                           f"id failed (no network / not in the HF cache / gated model without a token?): {err}") from err
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            offload = offload_text_encoders and name in ("text_encoder", "text_encoder_2")
            # dtype: a no-op when from_pretrained honoured dtype= (diffusers 0.42 does); it
            # guarantees the dtype on older diffusers that only knew torch_dtype=.
            component.to(device="cpu" if offload else device, dtype=dtype).requires_grad_(False).eval()
    return pipe


def add_lora(transformer: torch.nn.Module, rank: int = 64, alpha: float = 128,
             target_modules: str | tuple | list = FLUX_LORA_TARGETS, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter ("default") to the FLUX transformer; return its trainable parameters.

    Goes through diffusers' PEFT integration (`transformer.add_adapter`) so that the result saves
    and loads with `FluxPipeline.save_lora_weights` / `load_lora_weights` (see `save_lora`).
    Effective update W + (alpha / rank) * B A; B starts at 0, so the model starts exactly at the
    base model (the first importance ratio is 1). A is Gaussian-initialised as in the LoRA paper.
    LoRA weights are fp32 while the base stays in its dtype (bf16): optimizer state and small
    updates keep full precision, and peft casts the layer input to the LoRA dtype and the result
    back. Every non-LoRA parameter is frozen.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    # peft's two matching rules: a list of names matches module paths ending with ".name"; a single
    # string is a regex that must match the whole path. Check every target hits something, since
    # peft only complains when nothing at all matches.
    names, regex = [name for name, _ in transformer.named_modules()], isinstance(target_modules, str)
    target_modules = target_modules if regex else list(target_modules)
    unmatched = [t for t in ([target_modules] if regex else target_modules)
                 if not any(re.fullmatch(t, n) if regex else n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"LoRA {'target regex' if regex else 'targets'} {unmatched} {'matches' if regex else 'match'} "
                         f"no module of {type(transformer).__name__}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                                       target_modules=target_modules))  # peft: only the new lora_A / lora_B train
    cast_training_params(transformer, dtype=torch.float32)  # the trainable (LoRA) weights in fp32
    return [p for p in transformer.parameters() if p.requires_grad]


def _adapter_name(transformer: torch.nn.Module) -> str:
    """The transformer's one LoRA adapter (add_lora names it "default", diffusers' load_lora_weights "default_0")."""
    names = list(getattr(transformer, "peft_config", {}))
    if len(names) != 1:
        raise ValueError(f"the transformer has LoRA adapters {names}, not one: add one with add_lora")
    return names[0]


def save_lora(transformer: torch.nn.Module, directory: str | os.PathLike, state_dict=None) -> None:
    """Write the LoRA as a standard diffusers FLUX LoRA (pytorch_lora_weights.safetensors).

    The weights are peft's (get_peft_model_state_dict: LoRA only, keyed as diffusers' FLUX LoRA
    loader expects, no prefix). Saves the LoraConfig (rank, alpha, targets) as metadata next to the
    weights: without it, `load_lora_weights` cannot know alpha and silently loads with alpha = rank,
    i.e. scale 1 instead of alpha / rank (tests/test_flux.py shows it). `state_dict` overrides the
    weights (e.g. EMA weights with the same keys). Load with `pipe.load_lora_weights(directory)`.
    """
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    base = _unwrap(transformer)
    name = _adapter_name(base)
    FluxPipeline.save_lora_weights(
        str(directory), transformer_lora_layers=get_peft_model_state_dict(base, adapter_name=name) if state_dict is None
        else state_dict, transformer_lora_adapter_metadata=base.peft_config[name].to_dict())


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


def encode_prompts(pipe: "FluxPipeline", prompts, max_sequence_length: int = 512, device=None):
    """Encode prompts once (no grad) with FluxPipeline's own text path.

    Returns (cond, text_ids):
        cond = {"prompt_embeds": (P, L, D) T5 hidden states, "pooled_prompt_embeds": (P, Dp) CLIP pooled},
               in the text encoders' dtype; leading dim P = one row per prompt, as `rollout` wants;
        text_ids (L, 3) zeros, shared by every prompt (pass to `make_velocity_fn`, not in cond).
    L = max_sequence_length (T5 pads every prompt to it, as FluxPipeline does; 512 by default).
    Encoders kept elsewhere (load_flux(offload_text_encoders=True)) visit `device` for the encode.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not 1 <= max_sequence_length <= 512:
        raise ValueError(f"max_sequence_length must be in [1, 512] (FLUX's T5 limit), got {max_sequence_length}")
    device = torch.device(device if device is not None else pipe._execution_device)
    visiting = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e.device.type != device.type]
    try:
        for encoder in visiting:
            encoder.to(device)
        with torch.no_grad():
            # prompt_2=None: the same text goes to CLIP and to T5, as FluxPipeline does by default
            prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=max_sequence_length)
    finally:
        for encoder in visiting:  # back to CPU memory: not resident during rollout and update
            encoder.to("cpu")
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}, text_ids


# ---------------------------------------------------------------------------------------------
# Latent layout: VAE latent (N, C, h, w) <-> packed tokens (N, S, 4C), FluxPipeline's own helpers
# ---------------------------------------------------------------------------------------------


def latent_geometry(pipe: "FluxPipeline", height: int, width: int) -> tuple[int, int, int, int]:
    """(latent_h, latent_w, image_seq_len, channels_packed) for an image of height x width pixels.

    latent_h = height / vae_scale_factor; the transformer sees (latent_h/2) * (latent_w/2) tokens of
    4 * latent_channels each. FluxPipeline silently rounds sizes down to a multiple of
    2 * vae_scale_factor; here a size that is not a multiple is an error.
    """
    f, channels_packed = pipe.vae_scale_factor, _unwrap(pipe.transformer).config.in_channels
    if height <= 0 or width <= 0 or height % (2 * f) or width % (2 * f):
        raise ValueError(f"height and width must be positive multiples of {2 * f} (2 x vae_scale_factor {f}: the VAE "
                         f"downsamples by {f} and the transformer packs 2x2 latent patches), got {height}x{width}")
    if channels_packed != 4 * pipe.vae.config.latent_channels:
        raise ValueError(f"transformer in_channels {channels_packed} != 4 x VAE latent_channels "
                         f"{pipe.vae.config.latent_channels}: the transformer and VAE do not belong together")
    return height // f, width // f, (height // f // 2) * (width // f // 2), channels_packed


def token_grid_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE positions (0, row, column) of a rows x cols grid of packed image tokens, row-major, (S, 3)
    (FluxPipeline._prepare_latent_image_ids). The first axis (0 here) is shared with text_ids."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(None, rows, cols, device, dtype)  # (S, 3), row-major


def image_ids(pipe: "FluxPipeline", height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE positions of the packed image tokens of an H x W image, (S, 3) (see token_grid_ids)."""
    latent_h, latent_w, _, _ = latent_geometry(pipe, height, width)
    return token_grid_ids(latent_h // 2, latent_w // 2, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The velocity function
# ---------------------------------------------------------------------------------------------


def make_velocity_fn(transformer: torch.nn.Module, text_ids: torch.Tensor, img_ids: torch.Tensor,
                     guidance: float | None = 3.5, dtype: torch.dtype | None = None) -> VelocityFn:
    """Wrap the FLUX transformer as `velocity_fn(x, t, cond) -> v` for tree_sampler / tmpo.

    x: (N, S, C) packed latents (any float dtype; the sampler keeps fp32),
    t: (N,) sigma in [0, 1] (FluxPipeline passes scheduler timesteps / 1000, i.e. sigma; the
       transformer multiplies by 1000 again for its sinusoidal embedding),
    cond: {"prompt_embeds": (N, L, D), "pooled_prompt_embeds": (N, Dp)} (rows of `encode_prompts`).
    Returns v: (N, S, C) in x's dtype.

    `guidance`: FLUX.1-dev's distilled guidance scale, fed as an embedding (one forward pass, no
    CFG), as FluxPipeline's `guidance_scale` (3.5 in the paper). Must be None for a model without
    a guidance embedding (FLUX.1-schnell).
    dtype: the transformer's compute dtype; by default the dtype of its (base) weights. x, t and
    cond are cast to it on the way in, and v back to x's dtype on the way out: the transformer
    runs in bf16 as in the paper, while the sampler's state and the Gaussian log-probabilities of
    Eq. (48) stay in fp32 (in bf16, ||x' - mu||^2 over 65536 dims would lose the small
    differences the importance ratio of Eq. (7) is made of). Gradients flow through both casts.
    In bf16 the transformer sees bf16(sigma) (8 significant bits). FluxPipeline instead passes
    bf16(bf16(1000 sigma) / 1000) (it casts the scheduler's timestep to the latents' dtype, then
    divides by 1000 in bf16): one bf16 step apart at 4 of its 28 steps at 512^2 (none of the 6
    training steps). Rollout and update pass the same t, so neither rounding enters the ratio.
    """
    base = _unwrap(transformer)
    compute_dtype = dtype if dtype is not None else base.dtype
    if bool(base.config.guidance_embeds) != (guidance is not None):
        raise ValueError("this FLUX transformer has a guidance embedding (FLUX.1-dev): pass guidance (e.g. 3.5)"
                         if guidance is None else f"this FLUX transformer has no guidance embedding: pass "
                         f"guidance=None, not {guidance}")
    if text_ids.ndim != 2 or img_ids.ndim != 2 or text_ids.shape[1] != 3 or img_ids.shape[1] != 3:
        raise ValueError(f"text_ids and img_ids must be (L, 3) and (S, 3), got {tuple(text_ids.shape)}, {tuple(img_ids.shape)}")

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        n, s, _ = x.shape  # (N, S, C)
        if s != img_ids.shape[0]:
            raise ValueError(f"x has {s} tokens but img_ids has {img_ids.shape[0]}: wrong height/width?")
        prompt_embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]  # (N, L, D), (N, Dp)
        if prompt_embeds.shape[0] != n or prompt_embeds.shape[1] != text_ids.shape[0]:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} does not fit x {tuple(x.shape)} "
                             f"and text_ids {tuple(text_ids.shape)}")
        # FluxPipeline: guidance = full([1], scale, fp32).expand(N); the transformer scales it by 1000.
        g = None if guidance is None else torch.full((n,), float(guidance), device=x.device, dtype=torch.float32)
        v = transformer(hidden_states=x.to(compute_dtype), timestep=t.expand(n).to(compute_dtype),  # t: (N,) sigma
                        guidance=g, pooled_projections=pooled.to(compute_dtype),
                        encoder_hidden_states=prompt_embeds.to(compute_dtype), txt_ids=text_ids, img_ids=img_ids,
                        return_dict=False)[0]  # (N, S, C)
        return v.to(x.dtype)

    return velocity_fn


# ---------------------------------------------------------------------------------------------
# Sigma grid and decoding
# ---------------------------------------------------------------------------------------------


def flux_sigmas(pipe: "FluxPipeline", num_steps: int, height: int, width: int) -> torch.Tensor:
    """The (num_steps + 1,) sigma grid, 1 -> 0, FluxPipeline uses at this resolution.

    FluxPipeline's own call, on a copy of the pipeline's scheduler: the uniform grid
    linspace(1, 1/N, N) and mu = calculate_shift(image_seq_len, ...) through retrieve_timesteps.
    FLUX.1-dev's scheduler shifts the uniform grid by mu = linear in image_seq_len between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift): sigma' =
    e^mu / (e^mu + 1/sigma - 1). At 512x512 (S = 1024): mu = 0.63, sigma = 0.5 moves to 0.65 (more
    of the steps at high noise); 6 steps give 1, 0.904, 0.790, 0.652, 0.484, 0.273, 0. Read from
    the pipeline's scheduler config, so a differently configured checkpoint gets its own grid
    (tree_sampler.sigma_schedule is the same formula for the models built without a pipeline); a
    grid that does not run from pure noise (1) to data (0) is an error.
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    cfg = pipe.scheduler.config
    _, _, seq_len, _ = latent_geometry(pipe, height, width)
    mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler = type(pipe.scheduler).from_config(cfg)  # a copy: set_timesteps changes the scheduler's state
    uniform = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)  # as FluxPipeline
    retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=uniform, mu=mu)
    sigmas = scheduler.sigmas.float()  # (N + 1,)
    if len(sigmas) != num_steps + 1 or sigmas[0] != 1 or sigmas[-1] != 0 or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"the scheduler's grid {sigmas.tolist()} does not fall from 1 (noise) to 0 (data) in "
                         f"{num_steps} steps: the sampler needs one that does (check {type(scheduler).__name__}'s config)")
    return sigmas


def unpacked_latents(pipe: "FluxPipeline", x_packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Final packed latents (N, S, 4C) -> (N, C, h, w), still in the flow model's normalised space.

    This is the "VAE latent" z of LGMD (Sec. 5): we use the latent the flow model generates,
    ((VAE mean - shift_factor) * scaling_factor, roughly unit variance), not the raw VAE latent.
    The paper does not say which latent; our reading: two independent N(0, I) noises have
    ||z_i - z_j|| / sqrt(d) = sqrt(2), LGMD = +0.35, a scale on which the paper's values (+0.20
    healthy, < 0 collapse) make sense; the raw VAE latent is this one divided by scaling_factor
    (0.3611 for FLUX), which would add log(1/0.3611) = +1.02 to every LGMD.
    """
    from diffusers import FluxPipeline

    _, _, seq_len, channels = latent_geometry(pipe, height, width)
    if x_packed.ndim != 3 or x_packed.shape[1:] != (seq_len, channels):
        raise ValueError(f"cannot unpack {tuple(x_packed.shape)} to a {height}x{width} image: expected (N, {seq_len}, {channels})")
    return FluxPipeline._unpack_latents(x_packed, height, width, pipe.vae_scale_factor)  # (N, C, h, w)


def decode(pipe: "FluxPipeline", x_packed: torch.Tensor, height: int, width: int,
           max_batch: int | None = None) -> torch.Tensor:
    """Final packed latents (N, S, 4C) -> images (N, 3, H, W) float32 in [0, 1], no grad.

    As FluxPipeline's output path: unpack, undo the VAE normalisation (z / scaling_factor +
    shift_factor), VAE decode to [-1, 1], then x / 2 + 0.5 clamped to [0, 1] (VaeImageProcessor's
    denormalisation: the decoder slightly overshoots the pixel range). `max_batch` decodes in
    chunks to bound memory.
    """
    vae = pipe.vae
    z = unpacked_latents(pipe, x_packed, height, width)  # (N, C, h, w)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    chunks = [z] if max_batch is None else z.split(max_batch)
    images = []
    with torch.no_grad():
        for chunk in chunks:
            image = vae.decode(chunk.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]  # (n, 3, H, W)
            images.append((image.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


# ---------------------------------------------------------------------------------------------
# Memory: what one GPU holds during a training step (the plan train.py prints at start)
# ---------------------------------------------------------------------------------------------

GiB = 2**30


class _Saved:
    """What the pack hook stores in the graph instead of a tensor; its death frees the bytes."""

    __slots__ = ("tensor", "release")

    def __init__(self, tensor, release):
        self.tensor, self.release = tensor, release

    def __del__(self):
        self.release()


class SavedTensorMeter(torch.autograd.graph.saved_tensors_hooks):
    """Live and peak bytes of the tensors autograd saves for backward (use as a context manager).

    A torch.autograd.graph.saved_tensors_hooks pack hook adds a storage's bytes when a tensor of it
    is first saved and removes them when its last saved reference dies (backward frees the graph).
    Storages count once (a tensor saved by q, k and v is one storage) and are told apart by their
    StorageImpl, not their address, so meta tensors are counted too. The storages of `exclude`
    (parameters, buffers) are not counted: they exist whatever the update does. Workspaces and
    gradients are not saved tensors and are not counted either.
    """

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage()._cdata for t in exclude}
        self.live = self.peak = 0
        self._refs = collections.Counter()  # storage -> saved references alive
        super().__init__(self._pack, lambda saved: saved.tensor if isinstance(saved, _Saved) else saved)

    def __enter__(self):
        super().__enter__()
        return self

    def _pack(self, tensor):
        key, nbytes = tensor.untyped_storage()._cdata, tensor.untyped_storage().nbytes()
        if key in self.exclude:
            return tensor
        self._count(key, nbytes, 1)
        return _Saved(tensor, functools.partial(self._count, key, nbytes, -1))

    def _count(self, key, nbytes, step):  # a storage's bytes are live from its first saved reference to its last
        self._refs[key] += step
        if self._refs[key] == (step > 0):  # 1 after the first reference, 0 after the last
            self.live += step * nbytes
            self.peak = max(self.peak, self.live)


class _FlashAttentionOnMeta(torch.overrides.TorchFunctionMode):
    """On the meta device SDPA takes the math kernel, which saves the (S x S) attention weights;
    CUDA's flash / memory-efficient kernels and CPU's flash kernel save only q, k, v, the output and
    the log-sum-exp. Meta SDPA is routed to the CPU flash kernel, so meta counts what CUDA saves."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        a = {**dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal"), args)), **kwargs} \
            if func is torch.nn.functional.scaled_dot_product_attention else {}
        if a and a["query"].is_meta and a.get("attn_mask") is None:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                a["query"], a["key"], a["value"], a.get("dropout_p", 0.0), a.get("is_causal", False), scale=a.get("scale"))[0]
        return func(*args, **kwargs)


def activation_bytes(transformer: torch.nn.Module, img_ids: torch.Tensor, text_len: int) -> dict[str, int]:
    """Bytes autograd saves for ONE row (one image) of a forward with grad, counted on a meta copy.

    The copy has `transformer`'s config, dtype and LoRA, and lives on the meta device: shapes
    without memory or compute (~5 s for FLUX.1-dev), so the count is exact at any size. Counted on
    2 rows and halved (a batch of one shares a few views that larger batches copy): a call on n >= 2
    rows saves n times these, to 0.5% (tests/test_flux.py checks meta against a real CPU forward on a
    small FLUX, benchmarks/iteration_cost.py the update's saved tensors against the plan). Per row:
      grad          a forward with grad, no checkpointing: every block's saved tensors;
      checkpointed  with gradient checkpointing: the blocks' inputs (and what lies outside blocks);
      block         the largest block's saved tensors: what checkpointing recomputes at a time in
                    backward; also the plan's estimate of a no-grad forward's working set.
    Counted without autocast: with fp32 LoRA weights peft saves an fp32 copy of each LoRA layer's
    input, so this is the upper end (FSDP's bf16 gather and bf16 autocast save bf16 copies).
    """
    base = _unwrap(transformer)
    with torch.device("meta"):
        meta = type(base).from_config(base.config)
    meta.to(base.dtype).requires_grad_(False)
    if getattr(base, "peft_config", None):
        cfg = base.peft_config[_adapter_name(base)]
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        add_lora(meta, rank=cfg.r, alpha=cfg.lora_alpha, target_modules=targets)
    c = meta.config
    velocity_fn = make_velocity_fn(meta, torch.zeros(text_len, 3, device="meta"), img_ids.to("meta"),
                                   guidance=3.5 if c.guidance_embeds else None)
    x = torch.zeros(2, img_ids.shape[0], c.in_channels, device="meta")  # (2, S, C)
    cond = {"prompt_embeds": torch.zeros(2, text_len, c.joint_attention_dim, device="meta"),
            "pooled_prompt_embeds": torch.zeros(2, c.pooled_projection_dim, device="meta")}
    exclude = [*meta.parameters(), *meta.buffers()]
    out, starts, block = {}, [], []
    for b in [*meta.transformer_blocks, *meta.single_transformer_blocks]:  # live bytes across a block: its saved tensors
        b.register_forward_pre_hook(lambda *_: starts.append(meter.live))
        b.register_forward_hook(lambda *_: block.append(meter.live - starts.pop()))
    for key in ("grad", "checkpointed"):
        if key == "checkpointed":  # blocks then run inside torch.utils.checkpoint: the meter sees none of them
            meta.enable_gradient_checkpointing()
        meter = SavedTensorMeter(exclude)
        with _FlashAttentionOnMeta(), meter:
            velocity_fn(x, torch.full((2,), 0.5, device="meta"), cond)
        out[key] = meter.peak // 2
    return {**out, "block": max(block) // 2}


def module_bytes(*objects) -> int:
    """Bytes of the parameters and buffers of every torch module reachable from `objects` (modules,
    or objects holding them in attributes, lists or dicts, as the reward scorers do), LoRA weights
    excluded; each tensor once. Meta tensors (offloaded encoders, meta-built models) count too."""
    seen, sizes, todo = set(), {}, list(objects)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            sizes.update({id(t): t.numel() * t.element_size()
                          for n, t in [*obj.named_parameters(), *obj.named_buffers()] if "lora_" not in n})
        elif isinstance(obj, (list, tuple, set, dict)):
            todo += obj.values() if isinstance(obj, dict) else obj
        elif hasattr(obj, "__dict__"):
            todo += vars(obj).values()
    return sum(sizes.values())


def memory_parts(pipe: "FluxPipeline", *rewards) -> dict[str, int]:
    """Bytes of the models of a run, as `memory_plan` wants them: the transformer's base weights
    (and its largest block and the rest, FSDP's units), the LoRA parameter count, the encoders, the
    VAE and the reward scorers."""
    base = _unwrap(pipe.transformer)
    blocks = [module_bytes(b) for b in [*base.transformer_blocks, *base.single_transformer_blocks]]
    whole = module_bytes(base)
    return {"transformer": whole, "root": whole - sum(blocks), "unit": max(blocks),
            "lora": sum(p.numel() for n, p in base.named_parameters() if "lora_" in n),
            "text_encoders": module_bytes(pipe.text_encoder, pipe.text_encoder_2), "vae": module_bytes(pipe.vae),
            "rewards": module_bytes(*rewards)}


def memory_plan(parts: dict, act: dict, spec: tree_sampler.TreeSpec, groups: int = 1, *, rollout_batch: int = 0,
                update_chunk: int = 4, world_size: int = 1, sharded: bool = False, checkpointing: bool = True,
                offload_text_encoders: bool = True, device_bytes: int | None = None) -> dict:
    """Bytes one GPU needs for a training step: what stays resident, plus the largest working set
    (encode, rollout, update). parts: `memory_parts`; act: `activation_bytes` (per row).

    Resident:
      transformer  bf16 base, whole on every GPU (one GPU, DDP). FSDP2: the rank's 1/world of the
                   blocks, the root unit whole (embedders and output layer: never resharded) and two
                   blocks gathered at a time (the one computing and the one prefetched).
      lora         fp32: weights 4 + gradients 4 + AdamW moments 8 + EMA 4 = 20 bytes per parameter
                   (sharded under FSDP; DDP adds 4 for its gradient buckets).
      text encoders 0 when offloaded (load_flux(offload_text_encoders=True)), else whole.
      VAE, rewards whole on every GPU: small next to the transformer, used every step.
    Working sets (one after the other, so the largest one counts):
      encode       the offloaded text encoders, on the GPU while the step's prompts are encoded.
      rollout      rows per transformer call (--rollout-batch, or all G K leaves of the last steps)
                   x act["block"] (an estimate: no grad keeps one block's tensors at a time). The
                   tilted target's reference forwards run on the same rows after the policy's: no more.
      update       rows per backward (--update-chunk, parents of one SDE step) x act["grad"]; with
                   gradient checkpointing x (act["checkpointed"] + act["block"]): every block's
                   input, plus one block recomputed at a time in backward.
    Not planned: the VAE decode's and the reward forward's working sets (bounded by --decode-batch),
    the rollout's stored states (x, mean, children: 256 KiB per row at 512^2), CUDA workspaces and
    allocator fragmentation (compare with max_memory_allocated, not reserved memory).
    """
    shard = world_size if sharded else 1
    active = [groups * a for a in spec.active_nodes()]  # rows per denoising step
    parents = [active[n] for n in spec.fanout] or [0]  # rows of each SDE step's recompute
    rollout_rows = min(rollout_batch or max(active), max(active))
    update_rows = min(update_chunk, max(parents)) if update_chunk else sum(parents)
    per_row = act["checkpointed"] + act["block"] if checkpointing else act["grad"]
    resident = {
        "transformer": (parts["transformer"] - parts["root"]) / shard + parts["root"] + (2 * parts["unit"] if sharded else 0),
        "lora": parts["lora"] * (20 / shard + (4 if world_size > 1 and not sharded else 0)),
        "text_encoders": 0 if offload_text_encoders else parts["text_encoders"],
        "vae": parts["vae"], "rewards": parts["rewards"],
    }
    work = {"encode": parts["text_encoders"] if offload_text_encoders else 0,
            "rollout": rollout_rows * act["block"], "update": update_rows * per_row}
    peak = sum(resident.values()) + max(work.values())
    g = lambda b: f"{b / GiB:.3g}"  # noqa: E731
    lines = [f"memory per GPU (GiB, plan{f', FSDP over {world_size}' if sharded else ''}): resident "
             + " + ".join(f"{k} {g(v)}" for k, v in resident.items()) + f" = {g(sum(resident.values()))}; + max("
             + ", ".join(f"{k} {g(v)}" for k, v in work.items()) + f") = peak {g(peak)}"
             + (f" of {g(device_bytes)}" if device_bytes else ""),
             f"  (rollout {rollout_rows} rows x {g(act['block'])}; update {update_rows} rows x {g(per_row)}, gradient "
             f"checkpointing {'on' if checkpointing else 'off'}; text encoders {'offloaded' if offload_text_encoders else 'resident'})"]
    if device_bytes and peak > device_bytes:
        lines.append(f"WARNING: the plan needs {g(peak)} GiB per GPU, the device has {g(device_bytes)}: turn on "
                     "--gradient-checkpointing, lower --update-chunk or --rollout-batch, or shard with FSDP")
    return {**resident, **work, "peak": peak, "fits": not device_bytes or peak <= device_bytes, "lines": lines}


def fsdp_plugin():
    """accelerate's FSDP plugin for FLUX + LoRA, or None when `accelerate launch` did not ask for FSDP.

    With `mixed_precision: bf16` accelerate would build MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=bf16): the fp32 LoRA gradients would be reduce-scattered in bf16. Here parameters
    are gathered in bf16 (the frozen base is bf16 already; the fp32 LoRA shards are cast for compute)
    and gradients are reduced in fp32 into the fp32 LoRA shards. Everything else (FSDP2, the
    per-block wrap policy, resharding) comes from the launch config (its FSDP_* environment).
    The CPU tests run FSDP2 without mixed precision; the bf16 policy has not run on a GPU yet.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"
    return FullyShardedDataParallelPlugin(
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None)
