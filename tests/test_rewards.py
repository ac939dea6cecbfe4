"""Tests for rewards.py and the converters in tools/: every reward re-derived or checked against an
independent computation.

- HPS-v2.1: a tiny random checkpoint in open_clip's format, converted by tools/convert_hps.py (its command
  line, in a fresh process), loaded by rewards.py, against open_clip's forward re-derived in plain torch
  (conv patchify, class token, nn.MultiheadAttention semantics via F.multi_head_attention_forward, causal
  text blocks, argmax-token pooling); pooling equivalence; key accounting; converter and loader errors.
- ImageReward: the same for tools/convert_imagereward.py, against BLIP's ViT + med.py BERT with
  cross-attention + MLP head re-derived in plain torch; every key used exactly once; tokenizer layout.
- PickScore: 100 x cosine from the CLIPModel's own projections.
- GenEval: a real HTTP server on 127.0.0.1 (http.server, in a thread) speaking the reward-server protocol,
  and servers that misbehave: never reply, reply garbage or None, are not there.
- OCR: edit distances computed by hand; a real RapidOCR run on a rendered word (skipped if not installed).
- Multi-reward: the App. D.2 aggregate recomputed by hand, its invariances, and errors.
Reference-library tests (open_clip, the ImageReward package, torchvision) run where those import.

    python -m pytest -q tests/test_rewards.py
"""

import io
import json
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rewards  # noqa: E402
from tiny_rewards import (  # noqa: E402, F401  (fixtures are found by name)
    BLIP_VIT_WIDTH,
    HEADS,
    TOOLS,
    convert_hps,
    convert_imagereward,
    tiny_bert_tokenizer,
    tiny_clip_tokenizer,
    tiny_hps_dir,
    tiny_imagereward_dir,
    tiny_med_config,
    tiny_open_clip_cfg,
    tiny_open_clip_state_dict,
    tiny_pickscore_dir,
    write_tiny_hps_checkpoint,
    write_tiny_imagereward_checkpoint,
)

PROMPTS = ["a photo of a cat", "a red cube on the sign", 'a sign that says "hello"']


def _images(n=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _quantized(images):
    """What the scorers see: the 8-bit image, back in [0, 1]."""
    return (images * 255).round() / 255


def _normalize(x01):
    mean = torch.tensor(rewards.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(rewards.CLIP_STD).view(1, 3, 1, 1)
    return (x01 - mean) / std


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _lin(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


# ----------------------------------------------------------------------------------------------
# Input checks and preprocessing
# ----------------------------------------------------------------------------------------------


def test_unknown_reward_lists_known_names():
    with pytest.raises(ValueError, match="known rewards: pickscore, hps, imagereward, geneval, ocr"):
        rewards.load_reward("clipscore")


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.rand(2, 3, 8, 8) * 2, ["a", "b"], r"\[0, 1\]"),
        (torch.rand(2, 8, 8), ["a", "b"], r"\(N, 3, H, W\)"),
        (torch.rand(2, 3, 8, 8), ["a"], "one prompt per image"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], "NaN"),
        ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), ["a", "b"], "floating point"),
    ],
)
def test_bad_inputs_fail_with_what_to_fix(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        rewards.check_inputs(images, prompts)


def test_clip_pixels_is_torchvision_resize_center_crop_normalize():
    """Re-derive Resize(32, BICUBIC) + CenterCrop(32) + Normalize on a 40 (w) x 56 (h) image by hand:
    shorter side 40 -> 32, longer int(32 * 56 / 40) = 44, crop offset round((44 - 32) / 2) = 6."""
    from PIL import Image

    img = rewards.to_pil(_images(1, h=56, w=40))[0]
    assert img.size == (40, 56)
    expected = np.asarray(img.resize((32, 44), Image.BICUBIC), dtype=np.float32)[6:38, :, :] / 255.0  # (32, 32, 3)
    expected = _normalize(torch.from_numpy(expected).permute(2, 0, 1)[None])
    torch.testing.assert_close(rewards.clip_pixels([img], 32), expected, atol=1e-6, rtol=0)
    # At the target size nothing is resampled: only the uint8 quantisation and the normalisation remain.
    x = _images(2)
    torch.testing.assert_close(rewards.clip_pixels(rewards.to_pil(x), 32), _normalize(_quantized(x)), atol=1e-6, rtol=0)


def test_clip_pixels_matches_torchvision():
    try:
        from torchvision import transforms as T
    except Exception as e:
        pytest.skip(f"torchvision not importable ({type(e).__name__}); the hand re-derivation above covers it")
    tf = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(rewards.CLIP_MEAN, rewards.CLIP_STD)])
    for h, w in ((56, 40), (37, 61), (32, 32)):
        img = rewards.to_pil(_images(1, h=h, w=w))[0]
        torch.testing.assert_close(rewards.clip_pixels([img], 32)[0], tf(img), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# HPS-v2.1: open_clip checkpoint -> tools/convert_hps.py -> transformers CLIPModel folder
# ----------------------------------------------------------------------------------------------


def _ref_open_clip_block(x, sd, p, heads, attn_mask=None):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)), nn.GELU.
    Attention is nn.MultiheadAttention's own functional form on the fused in_proj."""
    W = x.shape[-1]
    h = _ln(x, sd, p + "ln_1", 1e-5).transpose(0, 1)  # (N, L, W) -> (L, N, W): MultiheadAttention's layout
    a, _ = F.multi_head_attention_forward(
        h, h, h, W, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=attn_mask,
    )
    x = x + a.transpose(0, 1)
    return x + _lin(F.gelu(_lin(_ln(x, sd, p + "ln_2", 1e-5), sd, p + "mlp.c_fc")), sd, p + "mlp.c_proj")


def ref_open_clip_image(sd, pixels, cfg):
    """open_clip VisionTransformer.forward + @ proj, from the state dict alone."""
    v = cfg["vision_cfg"]
    conv = sd["visual.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1])  # (N, W, g, g)
    x = x.flatten(2).transpose(1, 2)  # (N, g*g, W)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)  # (N, 1, W)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre", 1e-5)
    for i in range(v["layers"]):
        x = _ref_open_clip_block(x, sd, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"])
    return _ln(x[:, 0], sd, "visual.ln_post", 1e-5) @ sd["visual.proj"]


def ref_open_clip_text(sd, ids, cfg):
    """open_clip CLIP.encode_text: causal blocks, ln_final, the state at argmax(ids) (EOT), @ text_projection."""
    t = cfg["text_cfg"]
    L = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    mask = torch.full((L, L), float("-inf")).triu(1)  # open_clip's build_attention_mask
    for i in range(t["layers"]):
        x = _ref_open_clip_block(x, sd, f"transformer.resblocks.{i}.", t["heads"], attn_mask=mask)
    x = _ln(x, sd, "ln_final", 1e-5)
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ sd["text_projection"]


LONG_PROMPT = " ".join(["a red cube on the sign with a blue dog"] * 12)  # > 77 tokens: truncated


def _run_tool(script, *args):
    """Run a converter as a user does (a fresh process, its command line); returns its stdout."""
    result = subprocess.run([sys.executable, os.path.join(TOOLS, script), *map(str, args)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _convert_tiny(tmp_path_factory, write_checkpoint, script, config_flag, config_file):
    """(folder of an official-format tiny checkpoint, the folder tools/`script` made of it from the
    command line), the tokenizer and architecture config taken from the official folder."""
    root = tmp_path_factory.mktemp(script[:-3])
    official, out = root / "official", root / "converted"
    checkpoint = write_checkpoint(official)
    _run_tool(script, "--checkpoint", checkpoint, "--tokenizer", official, config_flag, official / config_file,
              "--out", out)
    return str(official), str(out)


@pytest.fixture(scope="module")
def hps_pair(tmp_path_factory):
    return _convert_tiny(tmp_path_factory, write_tiny_hps_checkpoint, "convert_hps.py", "--open-clip-config",
                         "open_clip_config.json")


def test_hps_conversion_matches_open_clip_forward(hps_pair):
    official, converted = hps_pair
    hps = rewards.load_reward("hps", path=converted)
    sd = torch.load(os.path.join(official, "HPS_v2.1_compressed.pt"), weights_only=True)["state_dict"]
    cfg = convert_hps.open_clip_model_cfg(os.path.join(official, "open_clip_config.json"))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = PROMPTS[:2] + [LONG_PROMPT]
    ids = hps.tokenize(prompts)
    assert ids.shape == (3, 77) and (ids[:, -1] == hps.tokenizer.eos_token_id)[2]  # truncated row still ends in EOT
    with torch.no_grad():
        img, txt = hps.embed(pixels, ids)
        ref_img, ref_txt = ref_open_clip_image(sd, pixels, cfg), ref_open_clip_text(sd, ids, cfg)
    assert ref_img.abs().mean() > 0.1 and ref_txt.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=1e-5)
    # The score is the cosine of the two (hpsv2: normalised features, no logit scale).
    images = _images(3, seed=2)
    with torch.no_grad():
        ref_cos = F.cosine_similarity(
            ref_open_clip_image(sd, _normalize(_quantized(images)), cfg), ref_open_clip_text(sd, ids, cfg), dim=-1
        )
    torch.testing.assert_close(hps(images, prompts), ref_cos, atol=1e-5, rtol=0)


def test_hps_text_pooling_is_open_clips_argmax_token(tiny_hps_dir):
    """CLIPTextModel pools at the first eos_token_id, open_clip at argmax(ids): with EOT the largest id,
    the same position, whatever fills the padding (this tokenizer pads with EOT, open_clip with 0)."""
    hps = rewards.load_reward("hps", path=tiny_hps_dir)
    tok = hps.tokenizer
    assert tok.eos_token_id == len(tok) - 1 and tok.pad_token_id == tok.eos_token_id
    ids = hps.tokenize(PROMPTS + [LONG_PROMPT])
    first_eot = (ids == tok.eos_token_id).int().argmax(dim=-1)
    assert torch.equal(first_eot, ids.argmax(dim=-1))
    text_model = hps.model.text_model
    with torch.no_grad():
        out = text_model(input_ids=ids)
        gathered = out.last_hidden_state[torch.arange(len(ids)), ids.argmax(dim=-1)]
        torch.testing.assert_close(out.pooler_output, gathered, atol=0, rtol=0)
        zero_padded = ids.clone()
        after_eot = torch.arange(ids.shape[1])[None] > first_eot[:, None]
        zero_padded[after_eot] = 0  # open_clip's tokenizer pads with 0
        torch.testing.assert_close(text_model(input_ids=zero_padded).pooler_output, out.pooler_output, atol=1e-6, rtol=0)


def test_hps_every_open_clip_key_used_exactly_once():
    cfg = tiny_open_clip_cfg(len(tiny_clip_tokenizer()))
    sd = tiny_open_clip_state_dict(cfg)
    sd["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)  # saved by some open_clip versions
    converted, dims, report = convert_hps.convert_open_clip_state_dict(sd, cfg)
    assert set(report) == set(sd)
    assert report["attn_mask"].startswith("ignored")
    targets = [t for v in report.values() if isinstance(v, list) for t in v]
    assert len(targets) == len(set(targets)) == len(converted)
    assert set(targets) == set(converted)
    from transformers import CLIPModel

    model = CLIPModel(convert_hps.clip_config(dims, tiny_clip_tokenizer()))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k] for k in converted)
    # the three q/k/v blocks of a fused in_proj are its row thirds
    q = converted["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = converted["vision_model.encoder.layers.1.self_attn.v_proj.weight"]
    W = cfg["vision_cfg"]["width"]
    assert torch.equal(q, sd["visual.transformer.resblocks.1.attn.in_proj_weight"][:W])
    assert torch.equal(v, sd["visual.transformer.resblocks.1.attn.in_proj_weight"][2 * W:])


def test_hps_converter_variants_and_errors(hps_pair, tmp_path):
    official, converted = hps_pair
    sd = torch.load(os.path.join(official, "HPS_v2.1_compressed.pt"), weights_only=True)["state_dict"]
    cfg_file = os.path.join(official, "open_clip_config.json")
    images = _images(2, seed=3)
    expected = rewards.load_reward("hps", path=converted)(images, PROMPTS[:2])
    # A bare state dict with DDP's "module." prefix converts to the same scorer.
    variant = tmp_path / "variant.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, variant)
    out = convert_hps.convert(str(variant), str(tmp_path / "out"), tokenizer=official, open_clip_config=cfg_file)
    torch.testing.assert_close(rewards.load_reward("hps", path=out)(images, PROMPTS[:2]), expected)
    # A used --out is refused before any work; --overwrite replaces an earlier conversion.
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hps.convert(str(variant), out, tokenizer=official, open_clip_config=cfg_file)
    convert_hps.convert(str(variant), out, tokenizer=official, open_clip_config=cfg_file, overwrite=True)
    (tmp_path / "someone_else").mkdir()
    (tmp_path / "someone_else" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier conversion"):
        convert_hps.convert(str(variant), str(tmp_path / "someone_else"), tokenizer=official, overwrite=True)
    assert (tmp_path / "someone_else" / "notes.txt").read_text() == "keep me"
    # An unknown key is an error, not silently dropped.
    torch.save({"state_dict": {**sd, "visual.extra.weight": torch.zeros(2)}}, variant)
    with pytest.raises(ValueError, match="visual.extra.weight"):
        convert_hps.convert(str(variant), str(tmp_path / "o2"), tokenizer=official, open_clip_config=cfg_file)
    # Without --open-clip-config the architecture is ViT-H-14, which the tiny file is not.
    torch.save({"state_dict": sd}, variant)
    with pytest.raises(ValueError, match="--open-clip-config"):
        convert_hps.convert(str(variant), str(tmp_path / "o3"), tokenizer=official)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()  # a failed conversion writes nothing


def test_hps_loader_says_which_script_to_run(hps_pair, tiny_imagereward_dir, tmp_path):
    official, _ = hps_pair
    checkpoint = os.path.join(official, "HPS_v2.1_compressed.pt")
    run = r"python tools/convert_hps\.py --checkpoint "
    with pytest.raises(FileNotFoundError, match=run + re.escape(checkpoint) + " --out DIR"):
        rewards.load_reward("hps", path=checkpoint)  # the official file itself
    with pytest.raises(FileNotFoundError, match="has no reward.json.*" + run + r"HPS_v2\.1_compressed\.pt"):
        rewards.load_reward("hps", path=official)  # the official folder
    with pytest.raises(FileNotFoundError, match="does not exist.*" + run):
        rewards.load_reward("hps", path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=run):
        rewards.load_reward("hps")  # no path: there is no converted folder on the hub
    with pytest.raises(ValueError, match="converted 'imagereward' folder, not hps"):
        rewards.load_reward("hps", path=tiny_imagereward_dir)


def test_cli_errors_name_the_file_without_a_traceback(tmp_path, capsys):
    for tool in (convert_hps, convert_imagereward):
        with pytest.raises(SystemExit) as exit_:
            tool.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2 and "missing.pt does not exist" in capsys.readouterr().err


def test_pickscore_hub_id_fails_clearly_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(FileNotFoundError, match=r"(?s)PickScore_v1.*hf download yuvalkirstain"):
        rewards.load_reward("pickscore")


def test_hps_matches_open_clip_package(hps_pair):
    try:
        from open_clip.model import CLIP
    except Exception as e:
        pytest.skip(f"open_clip not importable ({type(e).__name__}: {e}); it needs torchvision")
    official, converted = hps_pair
    cfg = convert_hps.open_clip_model_cfg(os.path.join(official, "open_clip_config.json"))
    ref = CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=False).eval()
    ref.load_state_dict(torch.load(os.path.join(official, "HPS_v2.1_compressed.pt"), weights_only=True)["state_dict"])
    hps = rewards.load_reward("hps", path=converted)
    pixels = torch.randn(2, 3, 32, 32)
    ids = hps.tokenize(PROMPTS[:2])
    with torch.no_grad():
        img, txt = hps.embed(pixels, ids)
        torch.testing.assert_close(img, ref.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt, ref.encode_text(ids), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------


def test_pickscore_is_100_times_cosine(tiny_pickscore_dir):
    from transformers import CLIPModel, CLIPProcessor

    ps = rewards.load_reward("pickscore", path=tiny_pickscore_dir)
    model = CLIPModel.from_pretrained(tiny_pickscore_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_pickscore_dir)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    images = _images(3, seed=4)
    pixels = processor.image_processor(images=rewards.to_pil(images), return_tensors="pt")["pixel_values"]
    # the processor's resize/crop/normalise at 32 px is the identity plus the normalisation
    torch.testing.assert_close(pixels, _normalize(_quantized(images)), atol=1e-5, rtol=0)
    text = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        txt = model.text_model(**text).pooler_output @ model.text_projection.weight.T
    expected = 100.0 * F.cosine_similarity(img, txt, dim=-1)
    scores = ps(images, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.std() > 1.0


def test_pickscore_missing_weights_and_processor(tmp_path, tiny_pickscore_dir):
    with pytest.raises(FileNotFoundError, match="hf download yuvalkirstain/PickScore_v1"):
        rewards.load_reward("pickscore", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PickScore processor.*laion|processor_path"):
        rewards.load_reward("pickscore", path=tiny_pickscore_dir, processor_path=str(tmp_path / "no_processor"))


def test_non_finite_score_names_reward_and_prompt(tiny_pickscore_dir):
    ps = rewards.load_reward("pickscore", path=tiny_pickscore_dir)
    ps.model.logit_scale.data.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"'pickscore'.*'a photo of a cat'"):
        ps(_images(3), PROMPTS)


# ----------------------------------------------------------------------------------------------
# ImageReward: ImageReward.pt -> tools/convert_imagereward.py -> transformers BLIP modules + head
# ----------------------------------------------------------------------------------------------


def _ref_heads(x, heads):
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)  # (N, L, W) -> (N, h, L, W/h)


def _ref_merge(x):
    n, h, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, h * d)  # (N, h, L, d) -> (N, L, h*d)


def ref_imagereward(sd, pixels, ids, mask, vit_heads, bert_heads):
    """ImageReward.score re-derived from ImageReward.pt alone: BLIP's timm ViT (pre-LN, eps 1e-6),
    med.py's BertModel (post-LN, eps 1e-12, additive -10000 mask, cross-attention to every patch),
    [CLS] -> mlp.layers (Linear chain, no activations), standardised."""
    V, T = "blip.visual_encoder.", "blip.text_encoder."
    conv = sd[V + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, conv, sd[V + "patch_embed.proj.bias"], stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[V + "cls_token"].expand(len(x), -1, -1), x], dim=1) + sd[V + "pos_embed"]
    i = 0
    while f"{V}blocks.{i}.norm1.weight" in sd:
        b = f"{V}blocks.{i}."
        h = _ln(x, sd, b + "norm1", 1e-6)
        n, length, width = h.shape
        qkv = _lin(h, sd, b + "attn.qkv").reshape(n, length, 3, vit_heads, width // vit_heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(width // vit_heads), dim=-1) @ qkv[2]
        x = x + _lin(_ref_merge(a), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
        i += 1
    image = _ln(x, sd, V + "norm", 1e-6)

    def attention(hq, hkv, p, additive_mask):
        q, k, v = (_ref_heads(_lin(src, sd, f"{p}.self.{n}"), bert_heads) for src, n in ((hq, "query"), (hkv, "key"), (hkv, "value")))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if additive_mask is not None:
            s = s + additive_mask
        ctx = _ref_merge(torch.softmax(s, dim=-1) @ v)
        return _ln(_lin(ctx, sd, f"{p}.output.dense") + hq, sd, f"{p}.output.LayerNorm", 1e-12)

    h = sd[T + "embeddings.word_embeddings.weight"][ids] + sd[T + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = _ln(h, sd, T + "embeddings.LayerNorm", 1e-12)
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's get_extended_attention_mask
    i = 0
    while f"{T}encoder.layer.{i}.attention.self.query.weight" in sd:
        b = f"{T}encoder.layer.{i}."
        h = attention(h, h, b + "attention", additive)
        h = attention(h, image, b + "crossattention", None)
        ff = _lin(F.gelu(_lin(h, sd, b + "intermediate.dense")), sd, b + "output.dense")
        h = _ln(ff + h, sd, b + "output.LayerNorm", 1e-12)
        i += 1
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        r = _lin(r, sd, f"mlp.layers.{j}")
    return (r.squeeze(-1) - convert_imagereward.IMAGEREWARD_MEAN) / convert_imagereward.IMAGEREWARD_STD


@pytest.fixture(scope="module")
def imagereward_pair(tmp_path_factory):
    return _convert_tiny(tmp_path_factory, write_tiny_imagereward_checkpoint, "convert_imagereward.py", "--med-config",
                         "med_config.json")


def test_imagereward_matches_blip_forward(imagereward_pair):
    official, converted = imagereward_pair
    ir = rewards.load_reward("imagereward", path=converted)
    sd = torch.load(os.path.join(official, "ImageReward.pt"), weights_only=True)
    images = _images(3, seed=5)
    prompts = PROMPTS[:2] + [LONG_PROMPT]
    tok = ir.tokenize(prompts)
    with torch.no_grad():
        expected = ref_imagereward(sd, _normalize(_quantized(images)), tok["input_ids"], tok["attention_mask"],
                                   vit_heads=BLIP_VIT_WIDTH // 64, bert_heads=HEADS)
    scores = ir(images, prompts)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 1e-3  # prompts and images change the score: not a constant comparison


def test_imagereward_tokenizer_is_imagerewards(tiny_imagereward_dir):
    ir = rewards.load_reward("imagereward", path=tiny_imagereward_dir)
    tok = ir.tokenizer
    base = len(tiny_bert_tokenizer())
    assert tok.convert_tokens_to_ids("[DEC]") == base and tok.convert_tokens_to_ids("[ENC]") == base + 1
    assert tok.bos_token == "[DEC]" and len(tok) == base + 2
    enc = ir.tokenize(["a photo of a cat", LONG_PROMPT])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == (2, convert_imagereward.IMAGEREWARD_MAX_LENGTH)
    assert (ids[:, 0] == tok.cls_token_id).all()  # [CLS] kept, as ImageReward's score(); not BLIP-ITM's [ENC]
    assert mask[0].sum() < ir.max_length and (ids[0][mask[0] == 0] == tok.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tok.sep_token_id  # truncated, still closed by [SEP]


def test_imagereward_every_key_used_exactly_once(imagereward_pair):
    official, converted = imagereward_pair
    sd = torch.load(os.path.join(official, "ImageReward.pt"), weights_only=True)
    parts, dims, report = convert_imagereward.convert_imagereward_state_dict(sd)
    assert set(report) == set(sd)
    ignored = {k for k, v in report.items() if isinstance(v, str)}
    assert ignored == {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias",
                       "blip.text_proj.weight", "blip.text_proj.bias"}
    targets = [t for v in report.values() if isinstance(v, list) for t in v]
    assert len(targets) == len(set(targets)) == len(sd) - len(ignored)
    ir = rewards.load_reward("imagereward", path=converted)
    for part, module in (("vision", ir.vision), ("text", ir.text)):
        own = {k: v.shape for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        assert set(parts[part]) == set(own) == {t[len(part) + 1:] for t in targets if t.startswith(part + ".")}
        assert all(torch.equal(parts[part][k], module.state_dict()[k]) for k in own)  # written and read back exactly
    assert dims["head_widths"] == [32, 1024, 128, 64, 16, 1]
    assert [tuple(m.weight.shape) for m in ir.head] == [(1024, 32), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert all(torch.equal(m.weight, w) and torch.equal(m.bias, b) for m, (w, b) in zip(ir.head, parts["head"]))
    assert (ir.mean, ir.std) == (0.16717362830052426, 1.0333394966054072)  # ImageReward-v1.0's constants


def test_imagereward_score_is_composition_of_converted_modules(tiny_imagereward_dir):
    """The scorer equals: vision -> text(cross-attending) -> [CLS] -> head, standardised."""
    ir = rewards.load_reward("imagereward", path=tiny_imagereward_dir)
    images = _images(2, seed=6)
    tok = ir.tokenize(PROMPTS[:2])
    with torch.no_grad():
        patches = ir.vision(pixel_values=_normalize(_quantized(images))).last_hidden_state
        cls = ir.text(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                      encoder_hidden_states=patches).last_hidden_state[:, 0]
        expected = (ir.head(cls).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(ir(images, PROMPTS[:2]), expected, atol=1e-5, rtol=0)


def test_imagereward_converter_and_loader_errors(imagereward_pair, hps_pair, tiny_hps_dir, tmp_path):
    official, _ = imagereward_pair
    med = os.path.join(official, "med_config.json")
    sd = torch.load(os.path.join(official, "ImageReward.pt"), weights_only=True)
    bad = tmp_path / "ImageReward.pt"
    torch.save({**sd, "blip.itm_head.weight": torch.zeros(2, 32)}, bad)
    with pytest.raises(ValueError, match="blip.itm_head.weight"):
        convert_imagereward.convert(str(bad), str(tmp_path / "o1"), med_config=med, tokenizer=official)
    torch.save(sd, bad)
    with pytest.raises(ValueError, match="tokenizer size"):  # a tokenizer that does not fit the embedding table
        convert_imagereward.convert(str(bad), str(tmp_path / "o2"), med_config=med, tokenizer=hps_pair[0])
    with pytest.raises(ValueError, match="med_config"):  # BLIP's default med_config is BERT-base, not the tiny file
        convert_imagereward.convert(str(bad), str(tmp_path / "o3"), tokenizer=official)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))  # a failed conversion writes nothing
    run = r"python tools/convert_imagereward\.py --checkpoint "
    with pytest.raises(FileNotFoundError, match=run + re.escape(str(bad))):
        rewards.load_reward("imagereward", path=str(bad))
    with pytest.raises(FileNotFoundError, match="has no reward.json.*" + run + r"ImageReward\.pt"):
        rewards.load_reward("imagereward", path=official)
    with pytest.raises(ValueError, match="converted 'hps' folder, not imagereward"):
        rewards.load_reward("imagereward", path=tiny_hps_dir)


def test_imagereward_matches_official_package(tmp_path, monkeypatch):
    try:
        from ImageReward.ImageReward import ImageReward as OfficialImageReward
        from ImageReward.models.BLIP import blip_pretrain
        from ImageReward.models.BLIP.vit import VisionTransformer
    except Exception as e:
        pytest.skip(f"the ImageReward package is not importable ({type(e).__name__}: {e}); see README, Reward models")

    def tokenizer(*args, **kwargs):  # ImageReward's init_tokenizer, on the tiny vocabulary
        tok = tiny_bert_tokenizer()
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tok.enc_token_id = tok.additional_special_tokens_ids[0]
        return tok

    def vit(*args, **kwargs):  # a 2-layer, 2-head ViT at ImageReward's 224 px / 16 px patches
        return VisionTransformer(img_size=224, patch_size=16, embed_dim=BLIP_VIT_WIDTH, depth=2, num_heads=2), BLIP_VIT_WIDTH

    monkeypatch.setattr(blip_pretrain, "init_tokenizer", tokenizer)
    monkeypatch.setattr(blip_pretrain, "create_vit", vit)
    vocab = len(tiny_bert_tokenizer()) + 2
    with open(tmp_path / "med_config.json", "w") as f:
        json.dump(tiny_med_config(vocab), f)
    torch.manual_seed(0)
    official = OfficialImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu").eval()
    with torch.no_grad():
        for p in official.mlp.parameters():  # ImageReward's own init makes the head ~0: widen it
            p.normal_(0.0, 0.1)
    torch.save(official.state_dict(), tmp_path / "ImageReward.pt")
    tiny_bert_tokenizer().save_pretrained(tmp_path)
    out = convert_imagereward.convert(str(tmp_path / "ImageReward.pt"), str(tmp_path / "converted"),
                                      med_config=str(tmp_path / "med_config.json"), tokenizer=str(tmp_path))
    ours = rewards.load_reward("imagereward", path=out)
    images = _images(2, h=240, w=300, seed=7)
    expected = torch.tensor([official.score(p, im) for p, im in zip(PROMPTS[:2], rewards.to_pil(images))])
    torch.testing.assert_close(ours(images, PROMPTS[:2]), expected.float(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# GenEval client against a real HTTP server
# ----------------------------------------------------------------------------------------------

COLORS = {"red": 0, "green": 1, "blue": 2}


class GenEvalStub:
    """A GenEval server speaking reward-server's protocol with a deterministic rule: an include
    clause {"class": c} holds when colour c is the image's dominant channel."""

    def __init__(self, fail_first=0, status=None, reply=None):
        # reply: a function of the unpickled request that returns the raw bytes of a 200 reply (misbehaviour)
        self.requests, self.fail_first, self.status, self.reply = [], fail_first, status, reply
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                stub.requests.append(body)
                if stub.status is not None or len(stub.requests) <= stub.fail_first:
                    self._reply(stub.status or 500, b"Traceback (most recent call last):\nKeyError: 'tag'\n")
                    return
                request = pickle.loads(body)
                self._reply(200, stub.reply(request) if stub.reply else pickle.dumps(stub.score(request)))

            def _reply(self, code, data):
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @staticmethod
    def score(data):
        from PIL import Image

        scores, strict = [], []
        for jpeg, meta in zip(data["images"], data["meta_datas"]):
            rgb = np.asarray(Image.open(io.BytesIO(jpeg), formats=["jpeg"]).convert("RGB"), dtype=np.float64)
            dominant = int(rgb.reshape(-1, 3).mean(0).argmax())
            met = [COLORS[c["class"]] == dominant for c in meta["include"]]
            scores.append(sum(met) / len(met))
            strict.append(1.0 if all(met) else 0.0)
        lenient = [0.0] * len(strict) if data["only_strict"] else strict
        return {"scores": scores, "rewards": lenient, "strict_rewards": strict, "group_rewards": {}, "group_strict_rewards": {}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _solid(colors, size=16):
    x = torch.zeros(len(colors), 3, size, size)
    for i, c in enumerate(colors):
        x[i, COLORS[c]] = 0.9
    return x


def _meta(classes):
    return {"tag": "colors", "prompt": "a photo", "include": [{"class": c, "count": 1} for c in classes]}


def test_geneval_client_protocol_strict_and_fraction():
    server = GenEvalStub()
    try:
        images = _solid(["red", "green", "blue", "red", "green"])
        metadata = [_meta(["red"]), _meta(["blue"]), _meta(["blue"]), _meta(["red", "green"]), _meta(["green", "green"])]
        prompts = ["a photo"] * 5
        strict = rewards.load_reward("geneval", path=server.url, batch_size=2)
        assert strict(images, prompts, metadata).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
        sent = [pickle.loads(b) for b in server.requests]
        assert [len(s["images"]) for s in sent] == [2, 2, 1]  # batched, order kept
        assert all(s["only_strict"] is True for s in sent)
        assert [m for s in sent for m in s["meta_datas"]] == metadata
        from PIL import Image

        assert Image.open(io.BytesIO(sent[0]["images"][0])).format == "JPEG"
        fraction = rewards.load_reward("geneval", path=server.url, strict=False)
        assert fraction(images, prompts, metadata).tolist() == [1.0, 0.0, 1.0, 0.5, 1.0]
        assert pickle.loads(server.requests[-1])["only_strict"] is False
        with pytest.raises(ValueError, match="GenEval metadata"):
            strict(images, prompts)
    finally:
        server.close()


def test_geneval_retries_then_succeeds():
    server = GenEvalStub(fail_first=2)
    try:
        client = rewards.GenEvalClient(server.url, retries=3, backoff=0.01, timeout=5)
        assert client(_solid(["blue"]), ["x"], [_meta(["blue"])]).tolist() == [1.0]
        assert len(server.requests) == 3
    finally:
        server.close()


def test_geneval_server_error_500_is_reported_after_retries():
    server = GenEvalStub(status=500)
    try:
        client = rewards.GenEvalClient(server.url, retries=2, backoff=0.01, timeout=5)
        with pytest.raises(rewards.RewardServerError, match=r"127\.0\.0\.1.*3 attempt.*HTTP 500: KeyError: 'tag'"):
            client(_solid(["red"]), ["x"], [_meta(["red"])])
        assert len(server.requests) == 3
    finally:
        server.close()


def test_geneval_client_error_is_not_retried():
    server = GenEvalStub(status=404)
    try:
        with pytest.raises(rewards.RewardServerError, match="HTTP 404"):
            rewards.GenEvalClient(server.url, retries=3, backoff=0.01)(_solid(["red"]), ["x"], [_meta(["red"])])
        assert len(server.requests) == 1
    finally:
        server.close()


def _free_port():
    with socket.socket() as s:  # a port nobody listens on (once this socket closes)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_geneval_unreachable_or_malformed_url_fails_at_construction():
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=rf"GenEval server at {url} is not reachable.*ConnectionError"):
        rewards.load_rewards("geneval", paths={"geneval": url})  # before any other model would load
    assert time.time() - start < 2
    for bad in ("127.0.0.1:18085", "http://:18085", "http://127.0.0.1:port"):
        with pytest.raises(ValueError, match="http://HOST:PORT"):
            rewards.GenEvalClient(bad)
    with pytest.raises(ValueError, match="timeout"):
        rewards.GenEvalClient(url, timeout=0)
    with pytest.raises(ValueError, match="retries"):
        rewards.GenEvalClient(url, retries=-1)


def test_geneval_server_gone_during_training_names_the_url():
    server = GenEvalStub()
    kwargs = {"geneval": {"retries": 2, "backoff": 0.01, "timeout": 0.5}}
    client = rewards.load_rewards("geneval", paths=[server.url], reward_kwargs=kwargs).rewards["geneval"]
    assert (client.timeout, client.retries) == (0.5, 2)  # reward_kwargs reached the client
    server.close()
    with pytest.raises(rewards.RewardServerError, match=rf"{server.url} failed after 3 attempt.*ConnectionError"):
        client(_solid(["red"]), ["x"], [_meta(["red"])])


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections (the kernel completes the handshake) and never replies."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def stalling_server():
    """An HTTP server that answers the reachability check (GET) and never finishes a POST."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            time.sleep(30)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_geneval_server_that_accepts_and_never_replies_fails_at_construction(silent_server):
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=rf"{silent_server} is not reachable or does not answer within 0.5 s"):
        rewards.GenEvalClient(silent_server, timeout=0.5)
    assert time.time() - start < 0.5 + 1.0


def test_geneval_server_that_stops_replying_fails_within_timeout_times_attempts(stalling_server):
    timeout, retries = 0.3, 2
    client = rewards.GenEvalClient(stalling_server, timeout=timeout, retries=retries, backoff=0.01)  # it answers GET
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=rf"{stalling_server} failed after 3 attempt.*ReadTimeout"):
        client(_solid(["red"]), ["x"], [_meta(["red"])])
    elapsed = time.time() - start
    assert (retries + 1) * timeout <= elapsed < (retries + 1) * timeout + 0.03 + 1.0  # + backoffs + slack


def test_geneval_deadline_bounds_a_whole_call(stalling_server):
    client = rewards.GenEvalClient(stalling_server, timeout=0.4, retries=50, backoff=0.01, deadline=1.0, batch_size=1)
    start = time.time()
    with pytest.raises(rewards.RewardServerError, match=r"deadline 1 s per call"):
        client(_solid(["red", "blue"]), ["x", "y"], [_meta(["red"]), _meta(["blue"])])
    assert 1.0 <= time.time() - start < 2.0


@pytest.mark.parametrize("reply, match", [
    (lambda req: b"<html><body>502 Bad Gateway</body></html>",
     r"not a pickled reply \(UnpicklingError\); it began b'<html>"),
    (lambda req: b"", r"not a pickled reply \(EOFError\); it began b''"),
    (lambda req: pickle.dumps(["not", "a", "dict"]), r"sent no list of 1 'strict_rewards'.*\['not', 'a', 'dict'\]"),
    (lambda req: pickle.dumps({"strict_rewards": [1.0, 0.0]}), r"sent no list of 1 'strict_rewards'"),
    (lambda req: pickle.dumps({"strict_rewards": [None], "scores": [0.5]}),
     r"'strict_rewards'\[0\] = None, not a number"),
])
def test_geneval_bad_200_reply_names_the_url_and_what_came_back(reply, match):
    server = GenEvalStub(reply=reply)
    try:
        client = rewards.GenEvalClient(server.url, retries=3, backoff=0.01, timeout=5)
        with pytest.raises(rewards.RewardServerError, match=rf"GenEval server at {server.url} .*{match}"):
            client(_solid(["red"]), ["x"], [_meta(["red"])])
        assert len(server.requests) == 1  # a reply that came back is not retried
    finally:
        server.close()


def test_geneval_reads_only_its_field():
    """None in a field the client does not use ("rewards" is skipped under only_strict) is not an error."""
    server = GenEvalStub(reply=lambda req: pickle.dumps({"strict_rewards": [1.0], "scores": [None], "rewards": None}))
    try:
        assert rewards.GenEvalClient(server.url)(_solid(["red"]), ["x"], [_meta(["red"])]).tolist() == [1.0]
        with pytest.raises(rewards.RewardServerError, match=r"'scores'\[0\] = None"):
            rewards.GenEvalClient(server.url, strict=False)(_solid(["red"]), ["x"], [_meta(["red"])])
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------
# OCR
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0),
                                     ("abc", "", 3), ("intention", "execution", 5)])
def test_levenshtein_hand_values(a, b, d):
    assert rewards.levenshtein(a, b) == d == rewards.levenshtein(b, a)


def test_ocr_similarity_and_quoted_text():
    assert rewards.ocr_similarity("Hello  World", "helloworld") == 1.0  # case and spaces ignored
    assert rewards.ocr_similarity("HELP", "hello") == pytest.approx(1 - 2 / 5)  # help -> hello: 1 sub + 1 insert
    assert rewards.ocr_similarity("", "hello") == 0.0
    assert rewards.ocr_similarity("xxhelloxx", "hello") == pytest.approx(1 - 4 / 9)  # extra text costs
    assert rewards.quoted_text('A neon sign reading "OPEN LATE" above a "door"') == "OPEN LATE"
    for bad in ("a sign with no quotes", 'an unclosed "quote', 'empty "" quotes'):
        with pytest.raises(ValueError, match="double quotes"):
            rewards.quoted_text(bad)


def test_ocr_reward_plumbing_with_a_fixed_engine():
    class Engine:  # RapidOCR's return format: ([[box, text, confidence], ...] or None, timings)
        def __init__(self, lines):
            self.lines, self.seen = lines, []

        def __call__(self, image):
            self.seen.append(image.size)
            return self.lines, [0.0]

    ocr = rewards.OCRReward(engine=Engine([[None, "HEL", 0.9], [None, "L0", 0.8]]))
    assert ocr(_images(1, h=20, w=30), ['a sign that says "Hello"']).tolist() == [pytest.approx(0.8)]  # "hell0" vs "hello"
    assert ocr.engine.seen == [(30, 20)]
    assert rewards.OCRReward(engine=Engine(None))(_images(1), ['"hi"']).tolist() == [0.0]
    with pytest.raises(ValueError, match="double quotes"):
        ocr(_images(1), ["no quotes here"])


def test_ocr_missing_engine_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install rapidocr-onnxruntime"):
        rewards.load_reward("ocr")


def test_ocr_reads_a_rendered_word():
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except Exception as e:
        pytest.skip(f"rapidocr-onnxruntime not installed ({type(e).__name__}); pip install rapidocr-onnxruntime")
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(img).text((12, 20), "HELLO", fill="black", font=ImageFont.load_default(size=40))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, 96, 256)
    blank = torch.ones_like(x)
    ocr = rewards.load_reward("ocr")
    scores = ocr(torch.stack([x, blank]), ['a sign that says "hello"', 'a sign that says "hello"'])
    assert scores.tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Multi-reward aggregation (App. D.2)
# ----------------------------------------------------------------------------------------------


def _z(x):
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, unbiased=False, keepdim=True) + 1e-4)


def test_aggregate_is_weighted_mean_of_group_zscores():
    g = torch.Generator().manual_seed(8)
    a = 22 + torch.randn(3, 5, generator=g)  # PickScore-like scale
    b = 0.3 + 0.01 * torch.randn(3, 5, generator=g)  # HPS-like scale
    total = rewards.aggregate_rewards({"pickscore": a, "hps": b}, "1,0.5")
    torch.testing.assert_close(total, (_z(a) + 0.5 * _z(b)) / 1.5)  # weights normalised to sum to 1
    # The release's weights (0.333, 0.333, 0.334) already sum to 1: used as they are.
    c = torch.randn(3, 5, generator=g)
    release = rewards.aggregate_rewards({"hps": a, "imagereward": b, "pickscore": c}, "0.333,0.333,0.334")
    torch.testing.assert_close(release, 0.333 * _z(a) + 0.333 * _z(b) + 0.334 * _z(c))
    # Rescaling/shifting one reward within a group leaves the aggregate unchanged (up to eps).
    scale, shift = torch.tensor([[10.0], [0.1], [3.0]]), torch.tensor([[5.0], [-2.0], [0.0]])
    moved = rewards.aggregate_rewards({"pickscore": a * scale + shift, "hps": b}, [1, 0.5])
    torch.testing.assert_close(moved, total, atol=1e-2, rtol=0)
    assert total.sum(-1).abs().max() < 1e-4  # z-scores sum to zero in each group
    # Copies of one reward aggregate to that reward's own z-score: the scale a single z-scored reward has.
    torch.testing.assert_close(rewards.aggregate_rewards({"hps": a, "pickscore": a, "imagereward": a}), _z(a))


def test_aggregate_is_not_standardised_again():
    """Three independent rewards: the within-group std of R is ~1/sqrt(3), not 1. A second z-score
    (as train.py's --reward-zscore did) would multiply beta's effect by ~1.73."""
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(2000, 27, generator=g) for n in ("hps", "imagereward", "pickscore")}  # G = 2000, K = 27
    R = rewards.aggregate_rewards(scores)
    factor = 1 / R.std(-1, unbiased=False).mean().item()
    assert abs(factor - math.sqrt(3)) < 0.05, factor
    torch.testing.assert_close(rewards.aggregate_rewards(scores, "1,1,1"), R)  # default = equal weights


def test_single_reward_passes_through_and_weight_errors():
    r = torch.randn(2, 4)
    assert rewards.aggregate_rewards({"hps": r}) is r
    with pytest.raises(ValueError, match="single reward"):
        rewards.aggregate_rewards({"hps": r}, [2.0])
    with pytest.raises(ValueError, match="one weight per reward"):
        rewards.aggregate_rewards({"hps": r, "pickscore": r}, "1,1,1")
    with pytest.raises(ValueError, match=r"must be numbers.*'1,abc'"):
        rewards.load_rewards("hps,pickscore", weights="1,abc")
    for bad in ("1,0", "1,-1", "1,inf", "1,nan"):
        with pytest.raises(ValueError, match="finite and > 0"):
            rewards.aggregate_rewards({"hps": r, "pickscore": r}, bad)
    with pytest.raises(ValueError, match="share the"):
        rewards.aggregate_rewards({"hps": r, "pickscore": r[:, :2]})
    with pytest.raises(ValueError, match="known rewards"):
        rewards.load_rewards("pickscore,aesthetic")
    with pytest.raises(ValueError, match="distinct"):
        rewards.load_rewards("hps,hps")


def test_multi_reward_on_tiny_models(tiny_pickscore_dir, tiny_hps_dir, tiny_imagereward_dir):
    paths = {"pickscore": tiny_pickscore_dir, "hps": tiny_hps_dir, "imagereward": tiny_imagereward_dir}
    multi = rewards.load_rewards("pickscore,hps,imagereward", weights="1,1,2", paths=paths)
    assert multi.names == ["pickscore", "hps", "imagereward"]
    images = _images(6, seed=9)
    prompts = ["a photo of a cat"] * 3 + ["a red cube"] * 3  # 2 groups of K = 3, group-major
    raw, total = multi(images, prompts, group_size=3)
    for name, path in paths.items():
        torch.testing.assert_close(raw[name], rewards.load_reward(name, path=path)(images, prompts))
    expected = rewards.aggregate_rewards({n: r.reshape(2, 3) for n, r in raw.items()}, [1, 1, 2]).reshape(-1)
    torch.testing.assert_close(total, expected)
    assert total.shape == (6,)
    with pytest.raises(ValueError, match="group_size"):
        multi(images, prompts)
    with pytest.raises(ValueError, match="mix prompts"):
        multi(images, prompts, group_size=2)
    assert multi.standardized  # train.py reads R as is
    single = rewards.load_rewards(["hps"], paths=[tiny_hps_dir])
    raw, total = single(images, prompts)
    assert total is raw["hps"] and not single.standardized  # train.py z-scores it (--reward-zscore)


# ----------------------------------------------------------------------------------------------
# The real architectures, at full size on the meta device (shapes only, no memory)
# ----------------------------------------------------------------------------------------------


def _shape(*shape):
    return torch.empty(*shape, device="meta")


def _open_clip_block_shapes(sd, prefix, width, mlp):
    for n in ("ln_1", "ln_2"):
        sd[f"{prefix}{n}.weight"], sd[f"{prefix}{n}.bias"] = _shape(width), _shape(width)
    sd[prefix + "attn.in_proj_weight"], sd[prefix + "attn.in_proj_bias"] = _shape(3 * width, width), _shape(3 * width)
    sd[prefix + "attn.out_proj.weight"], sd[prefix + "attn.out_proj.bias"] = _shape(width, width), _shape(width)
    sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"] = _shape(mlp, width), _shape(mlp)
    sd[prefix + "mlp.c_proj.weight"], sd[prefix + "mlp.c_proj.bias"] = _shape(width, mlp), _shape(width)


def test_hps_default_is_vit_h_14():
    """HPS_v2.1_compressed.pt's shapes (open_clip ViT-H-14) convert under the default config into a
    CLIPModel with 16 + 16 heads, 224 px / 14 px patches, and every tensor in place."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    sd = {"visual.conv1.weight": _shape(1280, 3, 14, 14), "visual.class_embedding": _shape(1280),
          "visual.positional_embedding": _shape(257, 1280), "visual.proj": _shape(1280, 1024),
          "token_embedding.weight": _shape(49408, 1024), "positional_embedding": _shape(77, 1024),
          "text_projection": _shape(1024, 1024), "logit_scale": _shape(())}
    for n in ("visual.ln_pre", "visual.ln_post"):
        sd[n + ".weight"], sd[n + ".bias"] = _shape(1280), _shape(1280)
    sd["ln_final.weight"], sd["ln_final.bias"] = _shape(1024), _shape(1024)
    for i in range(32):
        _open_clip_block_shapes(sd, f"visual.transformer.resblocks.{i}.", 1280, 5120)
    for i in range(24):
        _open_clip_block_shapes(sd, f"transformer.resblocks.{i}.", 1024, 4096)
    converted, dims, report = convert_hps.convert_open_clip_state_dict(sd)
    assert (dims["v_heads"], dims["t_heads"], dims["image_size"], dims["patch"]) == (16, 16, 224, 14)

    class Tok:  # the laion CLIP-H tokenizer's special ids
        bos_token_id, eos_token_id, pad_token_id = 49406, 49407, 49407

    with init_empty_weights():
        model = CLIPModel(convert_hps.clip_config(dims, Tok()))
    own = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(converted) == set(own) and all(converted[k].shape == own[k] for k in own)
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == "gelu"


def test_imagereward_default_is_blip_vit_l_bert_base():
    """ImageReward.pt's shapes (BLIP ViT-L/16 at 224 px, BERT-base with cross-attention, 30524 tokens)
    convert and match the default med_config."""
    V, T = "blip.visual_encoder.", "blip.text_encoder."
    sd = {V + "cls_token": _shape(1, 1, 1024), V + "pos_embed": _shape(1, 197, 1024),
          V + "patch_embed.proj.weight": _shape(1024, 3, 16, 16), V + "patch_embed.proj.bias": _shape(1024),
          V + "norm.weight": _shape(1024), V + "norm.bias": _shape(1024),
          T + "embeddings.word_embeddings.weight": _shape(30524, 768),
          T + "embeddings.position_embeddings.weight": _shape(512, 768),
          T + "embeddings.LayerNorm.weight": _shape(768), T + "embeddings.LayerNorm.bias": _shape(768)}
    for i in range(24):
        b = f"{V}blocks.{i}."
        for n, (o, k) in {"norm1": (1024, None), "norm2": (1024, None), "attn.qkv": (3072, 1024),
                          "attn.proj": (1024, 1024), "mlp.fc1": (4096, 1024), "mlp.fc2": (1024, 4096)}.items():
            sd[b + n + ".weight"], sd[b + n + ".bias"] = (_shape(o, k) if k else _shape(o)), _shape(o)
    for i in range(12):
        b = f"{T}encoder.layer.{i}."
        for part, kv in (("attention", 768), ("crossattention", 1024)):
            for n, k in (("query", 768), ("key", kv), ("value", kv)):
                sd[f"{b}{part}.self.{n}.weight"], sd[f"{b}{part}.self.{n}.bias"] = _shape(768, k), _shape(768)
            sd[f"{b}{part}.output.dense.weight"], sd[f"{b}{part}.output.dense.bias"] = _shape(768, 768), _shape(768)
            sd[f"{b}{part}.output.LayerNorm.weight"], sd[f"{b}{part}.output.LayerNorm.bias"] = _shape(768), _shape(768)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = _shape(3072, 768), _shape(3072)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = _shape(768, 3072), _shape(768)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = _shape(768), _shape(768)
    for j, (o, k) in zip((0, 2, 4, 6, 7), ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"mlp.layers.{j}.weight"], sd[f"mlp.layers.{j}.bias"] = _shape(o, k), _shape(o)
    parts, dims, report = convert_imagereward.convert_imagereward_state_dict(sd)
    assert set(report) == set(sd)
    assert (dims["image_size"], dims["patch"], dims["v_width"] // convert_imagereward.BLIP_VIT_HEAD_WIDTH) == (224, 16, 16)
    med = convert_imagereward.MED_CONFIG
    assert (med["hidden_size"], med["num_hidden_layers"], med["intermediate_size"], med["vocab_size"],
            med["max_position_embeddings"]) == (dims["t_width"], dims["t_layers"], dims["t_mlp"], dims["vocab"],
                                                dims["t_positions"])
    assert dims["head_widths"] == [768, 1024, 128, 64, 16, 1]
