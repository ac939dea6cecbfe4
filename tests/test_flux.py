"""flux.py against diffusers' FluxPipeline, on a tiny random FLUX folder built offline.

The central test (`test_ode_sampling_matches_flux_pipeline`) is a reference-equivalence test in
the style of minGPT's test_huggingface_import: the project's sampler, driven through
`flux.make_velocity_fn`, must reproduce `FluxPipeline.__call__` from the same initial latents.

    python -m pytest -x -q tests/test_flux.py
"""

import os
import shutil

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

import flux  # noqa: E402
import tree_sampler  # noqa: E402
from tiny_flux import FLUX_SCHEDULER_CONFIG, build_tiny_flux, tiny_flux_dir  # noqa: E402, F401

H = W = 64  # tiny VAE downsamples by 4: 16x16 latent -> 8x8 = 64 tokens of 16 channels
S, C = 64, 16
PROMPTS = ["a photo of a cat", "a red cube on a blue cube"]
MAX_LEN = 16  # T5 tokens; FLUX uses 512, the tiny model does not need them


@pytest.fixture
def pipe32(tiny_flux_dir):
    return flux.load_flux(tiny_flux_dir, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# The tiny folder and load_flux
# ---------------------------------------------------------------------------------------------


def test_tiny_folder_loads_with_diffusers_and_load_flux(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    assert type(pipe).__name__ == "FluxPipeline" and pipe.vae_scale_factor == 4
    assert pipe.transformer.config.guidance_embeds
    for key, value in FLUX_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value

    loaded = flux.load_flux(tiny_flux_dir)  # default bf16
    assert loaded.transformer.dtype == torch.bfloat16 and loaded.vae.dtype == torch.bfloat16
    for name in flux.FLUX_PARTS:
        component = getattr(loaded, name)
        if isinstance(component, torch.nn.Module):
            assert not any(p.requires_grad for p in component.parameters()), name
    assert flux.latent_geometry(loaded, H, W) == (16, 16, S, C)


def test_build_tiny_flux_is_deterministic(tmp_path, tiny_flux_dir):
    from safetensors.torch import load_file

    again = build_tiny_flux(tmp_path / "again")
    for part, fname in [("transformer", "diffusion_pytorch_model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors"),
                        ("text_encoder", "model.safetensors"), ("text_encoder_2", "model.safetensors")]:
        a, b = load_file(os.path.join(tiny_flux_dir, part, fname)), load_file(os.path.join(again, part, fname))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_load_flux_errors_name_what_is_wrong(tmp_path, tiny_flux_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flux.load_flux(str(tmp_path / "no_such_model"))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_flux_dir, incomplete)
    shutil.rmtree(incomplete / "tokenizer_2")
    (incomplete / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing model_index.json, tokenizer_2"):
        flux.load_flux(str(incomplete))
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        flux.load_flux(str(a_file))
    with pytest.raises(ValueError, match="dtype"):
        flux.load_flux(tiny_flux_dir, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def _lora_modules(transformer):
    return {name for name, module in transformer.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def test_add_lora_targets_dtypes_and_freezing(tiny_flux_dir):
    pipe = flux.load_flux(tiny_flux_dir)  # bf16 base, as in training
    transformer = pipe.transformer
    base_names = {name for name, _ in transformer.named_parameters()}
    params = flux.add_lora(transformer, rank=4, alpha=8)

    double = {f"transformer_blocks.0.{t}" for t in flux.FLUX_LORA_TARGETS}
    single = {f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")}
    assert _lora_modules(transformer) == double | single  # no LoRA on proj_mlp / proj_out / norms / embedders

    trainable = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    assert set(map(id, params)) == set(map(id, trainable.values()))
    assert all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    modules = dict(transformer.named_modules())
    expected_numel = sum(4 * (modules[m].in_features + modules[m].out_features) for m in double | single)
    assert sum(p.numel() for p in params) == expected_numel  # A (r, in) + B (out, r) per layer
    for name, p in transformer.named_parameters():
        if "lora_" not in name:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name
            assert name.replace(".base_layer", "") in base_names

    with pytest.raises(ValueError, match="match no module"):
        flux.add_lora(flux.load_flux(tiny_flux_dir).transformer, target_modules=["attn.to_qkv"])

    # The regex form reaches the single blocks' MLP and fused output without the final proj_out.
    other = flux.load_flux(tiny_flux_dir).transformer
    flux.add_lora(other, rank=2, alpha=2, target_modules=r".*single_transformer_blocks\.\d+\.(proj_mlp|proj_out)")
    assert _lora_modules(other) == {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"}
    with pytest.raises(ValueError, match="matches no module"):
        flux.add_lora(flux.load_flux(tiny_flux_dir).transformer, target_modules=r"proj_out\.\d+")


def _velocity(pipe, x, t, cond, text_ids):
    return flux.make_velocity_fn(pipe.transformer, text_ids, flux.image_ids(pipe, H, W))(x, t, cond)


def test_lora_starts_at_base_and_gets_fp32_gradients_through_bf16(tiny_flux_dir):
    pipe = flux.load_flux(tiny_flux_dir)  # bf16
    cond, text_ids = flux.encode_prompts(pipe, PROMPTS, max_sequence_length=MAX_LEN)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, S, C, generator=g)  # fp32 sampler state
    t = torch.tensor([0.9, 0.4])
    v_base = _velocity(pipe, x, t, cond, text_ids)
    params = flux.add_lora(pipe.transformer, rank=4, alpha=8)
    v = _velocity(pipe, x, t, cond, text_ids)
    assert v.dtype == torch.float32 and v.shape == (2, S, C)
    assert torch.equal(v, v_base)  # B = 0 at init: the adapted model is exactly the base model

    v.square().mean().backward()
    lora_b = [p for name, p in pipe.transformer.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_b)
    assert all(p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all() for p in lora_b)
    assert all(p.grad is None or p.requires_grad for p in pipe.transformer.parameters())
    assert len(params) == 2 * len(lora_b)


def test_lora_save_load_round_trip(tmp_path, tiny_flux_dir):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = flux.load_flux(tiny_flux_dir, dtype=torch.float32)
    cond, text_ids = flux.encode_prompts(pipe, PROMPTS, max_sequence_length=MAX_LEN)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, S, C, generator=g), torch.tensor([0.8, 0.2])
    v_base = _velocity(pipe, x, t, cond, text_ids)
    flux.add_lora(pipe.transformer, rank=4, alpha=8)
    with torch.no_grad():  # move B away from 0 so the adapter changes the output
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    v_lora = _velocity(pipe, x, t, cond, text_ids).detach()
    assert (v_lora - v_base).abs().max() > 1e-2

    flux.save_lora(pipe.transformer, tmp_path / "lora")
    fresh = flux.load_flux(tiny_flux_dir, dtype=torch.float32)
    flux.load_lora(fresh, tmp_path / "lora")
    torch.testing.assert_close(_velocity(fresh, x, t, cond, text_ids), v_lora, atol=1e-6, rtol=0)
    # ...and the reloaded adapter saves again (diffusers names it "default_0").
    flux.save_lora(fresh.transformer, tmp_path / "lora_again")

    # Why save_lora writes the LoraConfig: the bare call loses alpha; diffusers then loads with
    # alpha = rank (scale 1 instead of 8 / 4 = 2) and the output is silently different.
    FluxPipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    bare = flux.load_flux(tiny_flux_dir, dtype=torch.float32)
    bare.load_lora_weights(tmp_path / "bare")
    assert (_velocity(bare, x, t, cond, text_ids) - v_lora).abs().max() > 1e-3

    with pytest.raises(FileNotFoundError):
        flux.load_lora(fresh, tmp_path / "no_lora_here")


# ---------------------------------------------------------------------------------------------
# Layout: prompts, packing, ids, sigmas
# ---------------------------------------------------------------------------------------------


def test_encode_prompts_shapes(pipe32):
    cond, text_ids = flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=MAX_LEN)
    assert cond["prompt_embeds"].shape == (2, MAX_LEN, 32)
    assert cond["pooled_prompt_embeds"].shape == (2, 32)
    assert text_ids.shape == (MAX_LEN, 3) and not text_ids.any()
    assert not torch.allclose(cond["prompt_embeds"][0], cond["prompt_embeds"][1])
    assert not torch.allclose(cond["pooled_prompt_embeds"][0], cond["pooled_prompt_embeds"][1])
    single, _ = flux.encode_prompts(pipe32, PROMPTS[1], max_sequence_length=MAX_LEN)
    torch.testing.assert_close(single["prompt_embeds"][0], cond["prompt_embeds"][1])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        flux.encode_prompts(pipe32, [])
    with pytest.raises(ValueError, match="512"):
        flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=513)


def test_pack_unpack_ids_match_flux_pipeline(pipe32):
    from diffusers import FluxPipeline

    z = torch.randn(3, 4, 16, 12, generator=torch.Generator().manual_seed(2))  # (N, C, h, w), h != w
    packed = flux.pack(z)
    assert packed.shape == (3, 8 * 6, 16)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(z, 3, 4, 16, 12), atol=0, rtol=0)
    torch.testing.assert_close(flux.unpack(packed, 16, 12), z, atol=0, rtol=0)
    torch.testing.assert_close(  # the pipeline's unpack takes the *pixel* size: 64 x 48 at factor 4
        flux.unpacked_latents(pipe32, packed, 64, 48), FluxPipeline._unpack_latents(packed, 64, 48, 4), atol=0, rtol=0
    )
    ids = flux.image_ids(pipe32, 64, 48)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(1, 8, 6, "cpu", torch.float32), atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiples of 8"):
        flux.latent_geometry(pipe32, 60, 64)


@pytest.mark.parametrize("num_steps,size", [(6, 64), (28, 64), (28, 256), (6, 1024)])
def test_flux_sigmas_match_scheduler(pipe32, num_steps, size):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    _, _, seq_len, _ = flux.latent_geometry(pipe32, size, size)
    cfg = pipe32.scheduler.config
    mu = calculate_shift(seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    retrieve_timesteps(pipe32.scheduler, num_steps, "cpu",
                       sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)  # as FluxPipeline.__call__
    ours = flux.flux_sigmas(pipe32, num_steps, size, size)
    assert ours.shape == (num_steps + 1,) and ours.dtype == torch.float32 and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours, pipe32.scheduler.sigmas.float(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Reference equivalence: the project's ODE sampler == FluxPipeline
# ---------------------------------------------------------------------------------------------


def test_ode_sampling_matches_flux_pipeline(pipe32):
    num_steps = 6
    pipe32.set_progress_bar_config(disable=True)
    x_T = torch.randn(2, S, C, generator=torch.Generator().manual_seed(3))  # packed initial noise
    common = dict(prompt=PROMPTS, latents=x_T.clone(), num_inference_steps=num_steps, guidance_scale=3.5,
                  height=H, width=W, max_sequence_length=MAX_LEN)
    ref_latents = pipe32(output_type="latent", **common).images  # (2, S, C)
    ref_images = pipe32(output_type="pt", **common).images  # (2, 3, H, W) in [0, 1]

    cond, text_ids = flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=MAX_LEN)
    velocity_fn = flux.make_velocity_fn(pipe32.transformer, text_ids, flux.image_ids(pipe32, H, W), guidance=3.5)
    sigmas = flux.flux_sigmas(pipe32, num_steps, H, W)

    # (a) plain Euler loop with tree_sampler.ode_step
    x = x_T.clone()
    with torch.no_grad():
        for n in range(num_steps):
            t = sigmas[n].expand(2)
            x = tree_sampler.ode_step(x, velocity_fn(x, t, cond), sigmas[n], sigmas[n + 1])
    assert (x - x_T).abs().mean() > 0.1  # the sampler actually moved
    torch.testing.assert_close(x, ref_latents, atol=1e-6, rtol=0)

    # (b) tree_sampler.rollout with a one-root, no-branch tree (each group = one prompt)
    ro = tree_sampler.rollout(velocity_fn, tree_sampler.TreeSpec(num_steps, roots=1, fanout={}), sigmas, cond,
                              num_groups=2, event_shape=(S, C), x_root=x_T.clone())
    assert ro.nfe == 2 * num_steps and not ro.transitions
    torch.testing.assert_close(ro.x0, ref_latents, atol=1e-6, rtol=0)

    images = flux.decode(pipe32, ro.x0, H, W)
    assert images.shape == (2, 3, H, W) and images.dtype == torch.float32
    torch.testing.assert_close(images, ref_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(flux.decode(pipe32, ro.x0, H, W, max_batch=1), images, atol=1e-5, rtol=0)


def test_bf16_transformer_keeps_fp32_state(tiny_flux_dir, pipe32):
    """bf16 compute, fp32 in/out: the velocity is the fp32 one up to bf16 rounding."""
    pipe16 = flux.load_flux(tiny_flux_dir)  # bf16
    cond, text_ids = flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=MAX_LEN)  # fp32 embeds
    x, t = torch.randn(2, S, C, generator=torch.Generator().manual_seed(4)), torch.tensor([1.0, 0.5])
    v32 = _velocity(pipe32, x, t, cond, text_ids)
    v16 = _velocity(pipe16, x, t, cond, text_ids)
    assert v16.dtype == torch.float32
    rel = (v16 - v32).norm() / v32.norm()
    assert 0 < rel < 3e-2  # differs (really ran in bf16) but only by rounding


def test_make_velocity_fn_checks_its_inputs(pipe32):
    cond, text_ids = flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=MAX_LEN)
    ids = flux.image_ids(pipe32, H, W)
    with pytest.raises(ValueError, match="guidance embedding"):
        flux.make_velocity_fn(pipe32.transformer, text_ids, ids, guidance=None)
    velocity_fn = flux.make_velocity_fn(pipe32.transformer, text_ids, ids)
    with pytest.raises(ValueError, match="tokens"):
        velocity_fn(torch.zeros(2, S + 4, C), torch.ones(2), cond)
    with pytest.raises(ValueError, match="prompt_embeds"):
        velocity_fn(torch.zeros(3, S, C), torch.ones(3), cond)
