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
    fresh.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader reads what save_lora wrote
    torch.testing.assert_close(_velocity(fresh, x, t, cond, text_ids), v_lora, atol=1e-6, rtol=0)
    # ...and the reloaded adapter saves again (diffusers names it "default_0").
    flux.save_lora(fresh.transformer, tmp_path / "lora_again")

    # Why save_lora writes the LoraConfig: the bare call loses alpha; diffusers then loads with
    # alpha = rank (scale 1 instead of 8 / 4 = 2) and the output is silently different.
    FluxPipeline.save_lora_weights(tmp_path / "bare", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    bare = flux.load_flux(tiny_flux_dir, dtype=torch.float32)
    bare.load_lora_weights(tmp_path / "bare")
    assert (_velocity(bare, x, t, cond, text_ids) - v_lora).abs().max() > 1e-3


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
    packed = FluxPipeline._pack_latents(z, 3, 4, 16, 12)  # (3, 8 * 6, 16): 2x2 patches as tokens
    # unpacked_latents inverts the pipeline's packing at the *pixel* size: 64 x 48 at factor 4
    torch.testing.assert_close(flux.unpacked_latents(pipe32, packed, 64, 48), z, atol=0, rtol=0)
    # token (r, c) holds latent patch z[:, :, 2r:2r+2, 2c:2c+2], channels ordered (c, dy, dx)
    torch.testing.assert_close(packed[:, 3 * 6 + 4], z[:, :, 6:8, 8:10].reshape(3, 16), atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot unpack"):
        flux.unpacked_latents(pipe32, packed, 64, 64)
    ids = flux.image_ids(pipe32, 64, 48)  # (row, column) of each token, row-major over 8 x 6 tokens
    assert ids.shape == (48, 3) and not ids[:, 0].any()
    assert ids[3 * 6 + 4].tolist() == [0, 3, 4] and ids[-1].tolist() == [0, 7, 5]
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
    # ... and it is the shift formula tree_sampler.sigma_schedule writes out (the toy's and benchmark's grid)
    shift = dict(base_seq_len=cfg.base_image_seq_len, max_seq_len=cfg.max_image_seq_len, base_shift=cfg.base_shift,
                 max_shift=cfg.max_shift)
    torch.testing.assert_close(ours, tree_sampler.sigma_schedule(num_steps, image_seq_len=seq_len, **shift), atol=1e-6, rtol=0)


def test_flux_sigmas_refuses_a_grid_that_does_not_fall_from_noise_to_data(pipe32):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe32.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**pipe32.scheduler.config, "invert_sigmas": True})
    with pytest.raises(ValueError, match="does not fall from 1"):
        flux.flux_sigmas(pipe32, 6, H, W)


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


# ---------------------------------------------------------------------------------------------
# Offloaded text encoders, FSDP mixed precision, memory
# ---------------------------------------------------------------------------------------------


def test_offloaded_text_encoders_stay_in_cpu_memory_and_encode_the_same(tiny_flux_dir, pipe32):
    offloaded = flux.load_flux(tiny_flux_dir, dtype=torch.float32, offload_text_encoders=True)
    for name in ("text_encoder", "text_encoder_2"):
        assert getattr(offloaded, name).device.type == "cpu"
    cond, ids = flux.encode_prompts(offloaded, PROMPTS, max_sequence_length=MAX_LEN, device="cpu")
    ref, ref_ids = flux.encode_prompts(pipe32, PROMPTS, max_sequence_length=MAX_LEN, device="cpu")
    assert all(torch.equal(cond[k], ref[k]) for k in ref) and torch.equal(ids, ref_ids)
    assert offloaded.text_encoder_2.device.type == "cpu"  # back after the encode (a no-op on CPU; the GPU path is not run here)


def test_fsdp_plugin_gathers_bf16_and_reduces_fp32(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert flux.fsdp_plugin() is None  # not launched with an FSDP config: no plugin
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    policy = flux.fsdp_plugin().mixed_precision_policy
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert flux.fsdp_plugin().mixed_precision_policy is None  # fp32 runs: no casts at all


def test_saved_tensor_meter_closed_form():
    a = torch.randn(1000, requires_grad=True)  # 4000 bytes
    with flux.SavedTensorMeter() as meter:
        b = a.exp()  # exp saves its result: 4000 bytes
        c = b.exp()  # another 4000
        assert meter.live == 8000
        c.sum().backward()
    assert meter.peak == 8000 and meter.live == 0
    with flux.SavedTensorMeter() as meter:
        (a * a).sum().backward()  # mul saves both operands, the same storage: counted once
    assert meter.peak == 4000 and meter.live == 0
    with flux.SavedTensorMeter(exclude=[a]) as meter:  # a parameter is not activation memory
        (a * a).sum().backward()
    assert meter.peak == 0
    m = torch.zeros(250, 2, device="meta", requires_grad=True)  # meta tensors count by shape (no address)
    with flux.SavedTensorMeter() as meter:
        (m.exp() * 2).sum()
    assert meter.peak == 2000


def _small_flux(device, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=48, guidance_embeds=True,
            axes_dims_rope=(8, 12, 12))
    transformer.to(dtype).requires_grad_(False)
    flux.add_lora(transformer, rank=8, alpha=16)
    return transformer


def test_activation_bytes_counted_on_meta_equal_a_real_cpu_forward():
    """The meta-device count (shapes only) is exactly what a real forward with grad saves on CPU:
    without checkpointing, with it, and per block; so the same count at FLUX.1-dev size is exact."""
    transformer = _small_flux("cpu")
    rows, cols, text_len = 6, 8, 16
    act = flux.activation_bytes(transformer, flux.token_grid_ids(rows, cols), text_len)
    velocity_fn = flux.make_velocity_fn(transformer, torch.zeros(text_len, 3), flux.token_grid_ids(rows, cols))
    x, t = torch.randn(2, rows * cols, 64), torch.full((2,), 0.5)  # activation_bytes counts 2 rows, halved
    cond = {"prompt_embeds": torch.randn(2, text_len, 64), "pooled_prompt_embeds": torch.randn(2, 48)}
    exclude = [*transformer.parameters(), *transformer.buffers()]
    measured, blocks = {}, []
    for key in ("grad", "checkpointed"):
        if key == "checkpointed":
            transformer.enable_gradient_checkpointing()
        with flux.SavedTensorMeter(exclude) as meter:
            if key == "grad":  # each block alone: live bytes across it
                for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                    b.register_forward_pre_hook(lambda *_: blocks.append(-meter.live))
                    b.register_forward_hook(lambda *_: blocks.append(blocks.pop() + meter.live))
            velocity_fn(x, t, cond).sum().backward()
            for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                b._forward_hooks.clear()
                b._forward_pre_hooks.clear()
        measured[key] = meter.peak
        assert meter.live == 0
    assert {k: 2 * v for k, v in act.items()} == {**measured, "block": max(blocks)}
    assert act["checkpointed"] < act["block"] < act["grad"]
    # n rows save n times as much (what memory_plan multiplies by)
    transformer.disable_gradient_checkpointing()
    with flux.SavedTensorMeter(exclude) as meter:
        velocity_fn(torch.randn(5, rows * cols, 64), t[:1].expand(5), {k: torch.randn(5, *v.shape[1:]) for k, v in cond.items()})
    assert meter.peak == pytest.approx(5 * act["grad"], rel=0.005)


# FLUX.1-dev as published (black-forest-labs/FLUX.1-dev: transformer/, text_encoder/ (CLIP-L),
# text_encoder_2/ (T5-v1.1-XXL encoder), vae/ config.json) and PickScore_v1 (CLIP-H/14).
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def flux_dev_plan_inputs():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**FLUX_DEV)
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
        pickscore = CLIPModel(CLIPConfig(
            projection_dim=1024,
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                               patch_size=14, image_size=224)))
    for module in (transformer, t5, clip, vae):
        module.to(torch.bfloat16)  # train.py's dtype on a GPU; the reward model stays fp32 (--reward-dtype)
    n_base = sum(p.numel() for p in transformer.parameters())
    flux.add_lora(transformer)  # the paper's rank 64, alpha 128 on the paper's targets
    pipe = SimpleNamespace(transformer=transformer, text_encoder=clip, text_encoder_2=t5, vae=vae)
    parts = flux.memory_parts(pipe, pickscore)
    act = flux.activation_bytes(transformer, flux.token_grid_ids(32, 32), 512)  # 512^2: 32 x 32 tokens, 512 T5 tokens
    return SimpleNamespace(n_base=n_base, transformer=transformer, parts=parts, act=act, t5=t5, clip=clip, pickscore=pickscore)


def test_memory_plan_of_flux_dev_from_meta_parameter_counts(flux_dev_plan_inputs):
    d = flux_dev_plan_inputs
    n_lora = sum(p.numel() for n, p in d.transformer.named_parameters() if "lora_" in n)
    lora_layers = {n.split(".lora_")[0] for n, _ in d.transformer.named_parameters() if "lora_" in n}
    assert (d.n_base, n_lora, len(lora_layers)) == (11_901_408_320, 179_306_496, 342)  # 11.90 B, 179.3 M on 19 x 12 + 38 x 3
    text = sum(t.numel() * t.element_size() for m in (d.t5, d.clip) for t in [*m.parameters(), *m.buffers()])
    assert d.parts["transformer"] == 2 * d.n_base and d.parts["lora"] == n_lora and d.parts["text_encoders"] == text
    assert round(text / 2**30, 2) == 9.10  # T5-XXL encoder 4.76 B + CLIP-L 0.12 B parameters, bf16
    reward = sum(t.numel() * t.element_size() for t in [*d.pickscore.parameters(), *d.pickscore.buffers()])
    assert d.parts["rewards"] == reward and round(reward / 2**30, 2) == 3.67  # fp32 CLIP-H/14, 0.99 B parameters
    blocks = [*d.transformer.transformer_blocks, *d.transformer.single_transformer_blocks]
    assert d.parts["unit"] == 2 * sum(p.numel() for n, p in blocks[0].named_parameters() if "lora_" not in n)
    GiB = 2**30
    # activations saved per image at 512^2 (meta count): 11.8 GiB; with checkpointing 0.51 (+ one block, 0.28)
    assert [round(d.act[k] / GiB, 2) for k in ("grad", "checkpointed", "block")] == [11.80, 0.51, 0.28]

    tree = tree_sampler.TreeSpec.tree(6, (0, 2, 3), 3)  # K = 27, the default tree
    one = flux.memory_plan(d.parts, d.act, tree, device_bytes=80e9)  # defaults: checkpointing, chunk 4, all rows
    assert one["transformer"] == d.parts["transformer"] and one["lora"] == 20 * n_lora  # weights + grads + AdamW + EMA
    assert one["text_encoders"] == 0 and one["encode"] == d.parts["text_encoders"]  # offloaded, visits to encode
    assert one["update"] == 4 * (d.act["checkpointed"] + d.act["block"]) and one["rollout"] == 27 * d.act["block"]
    assert one["fits"] and round(one["peak"] / GiB, 1) == 38.4  # one 80 GB GPU, no sharding
    fsdp = flux.memory_plan(d.parts, d.act, tree, world_size=8, sharded=True, device_bytes=24e9)
    assert fsdp["transformer"] == (d.parts["transformer"] - d.parts["root"]) / 8 + d.parts["root"] + 2 * d.parts["unit"]
    assert fsdp["lora"] == 20 * n_lora / 8
    assert fsdp["fits"] and round(fsdp["peak"] / GiB, 1) == 17.5  # 8 GPUs of 24 GB
    # what does not fit: no checkpointing with 4 parents per backward, and the encoders resident (the old DDP default)
    assert not flux.memory_plan(d.parts, d.act, tree, checkpointing=False, device_bytes=80e9)["fits"]
    old = flux.memory_plan(d.parts, d.act, tree, world_size=8, checkpointing=False, offload_text_encoders=False,
                           device_bytes=80e9)
    assert not old["fits"] and round(old["peak"] / GiB, 1) == 86.3 and "WARNING" in old["lines"][-1]
