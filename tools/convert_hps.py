"""Convert HPS-v2.1 (an open_clip ViT-H-14 checkpoint) into a transformers CLIPModel folder, once.

HPS-v2.1 (Wu et al. 2023) ships as HPS_v2.1_compressed.pt, a state dict of open_clip's CLIP, which
needs open_clip and torchvision to load. The two architectures are the same network (pre-LN ViT
image tower, causal text transformer, linear projections), so the weights map key by key onto
transformers' CLIPModel; rewards.py then loads the result with CLIPModel.from_pretrained. The
equivalence is tested in tests/test_rewards.py against open_clip's forward re-derived in plain torch.

    hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir ckpt
    hf download laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include "*.json" --include "*.txt" --local-dir laion_clip_h
    python tools/convert_hps.py --checkpoint ckpt/HPS_v2.1_compressed.pt --tokenizer laion_clip_h --out models/hps

The output folder (`--out`) holds config.json + model.safetensors (CLIPModel), the CLIP BPE tokenizer
files, and reward.json (the marker rewards.py checks). Load it with
`rewards.load_reward("hps", "models/hps")` (train.py: --reward-path hps=models/hps).

Mapping (open_clip -> transformers):
    visual.conv1 / class_embedding / positional_embedding   vision_model.embeddings.*
    visual.ln_pre, visual.ln_post, ln_final                 pre_layrnorm, post_layernorm, final_layer_norm
    *.resblocks.N.attn.in_proj_{weight,bias}                self_attn.{q,k,v}_proj (row thirds of the fused matrix)
    *.resblocks.N.{ln_1, ln_2, attn.out_proj, mlp.c_fc, mlp.c_proj}   layer_norm1/2, out_proj, mlp.fc1/fc2
    visual.proj, text_projection  (x @ proj)                 visual_projection / text_projection (.weight = proj.T)
    token_embedding, positional_embedding, logit_scale      text_model.embeddings.*, logit_scale
Both use nn.GELU (not QuickGELU) and LayerNorm eps 1e-5. Text pooling: open_clip takes the state
at argmax(token ids), CLIPTextModel at the first eos_token_id; they agree because EOT is the
tokenizer's largest id (checked here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checkpoint_utils import (KeyTaker, build_empty, check_out, count_blocks, load_checkpoint, prepare_out,
                              write_reward_json)  # noqa: E402

LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the CLIP BPE tokenizer open_clip uses for ViT-H-14

# open_clip's ViT-H-14 model config (open_clip/model_configs/ViT-H-14.json), with open_clip's
# defaults written out: mlp_ratio 4.0, nn.GELU (not QuickGELU), LayerNorm eps 1e-5.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24, "mlp_ratio": 4.0},
}


def open_clip_model_cfg(file: str | None = None) -> dict:
    """The open_clip architecture: from `file` (open_clip's JSON, {"model_cfg": {...}} or the bare config)
    if given, else ViT-H-14 (HPS-v2.1's architecture)."""
    if file is None:
        return VIT_H_14
    with open(file) as f:
        cfg = json.load(f)
    return cfg.get("model_cfg", cfg)


def open_clip_dims(sd: dict, model_cfg: dict) -> dict:
    """Read every size from the checkpoint, check it against `model_cfg`, take head counts from it."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    try:
        conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
        n_pos = sd["visual.positional_embedding"].shape[0]  # grid^2 + 1
        dims = {
            "v_width": conv.shape[0],
            "patch": conv.shape[-1],
            "grid": math.isqrt(n_pos - 1),
            "v_layers": count_blocks(sd, "visual.transformer.resblocks."),
            "v_mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "embed": sd["visual.proj"].shape[1],  # visual.proj is (width, embed_dim)
            "vocab": sd["token_embedding.weight"].shape[0],
            "t_width": sd["token_embedding.weight"].shape[1],
            "context": sd["positional_embedding"].shape[0],
            "t_layers": count_blocks(sd, "transformer.resblocks."),
            "t_mlp": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        }
    except KeyError as e:
        raise ValueError(f"not an open_clip ViT CLIP state dict: missing {e}") from e
    if dims["grid"] ** 2 + 1 != n_pos:
        raise ValueError(f"visual.positional_embedding has {n_pos} rows, not grid^2 + 1")
    expected = {
        "v_width": v["width"],
        "patch": v["patch_size"],
        "grid": v["image_size"] // v["patch_size"],
        "v_layers": v["layers"],
        "v_mlp": int(v["width"] * v.get("mlp_ratio", 4.0)),
        "embed": model_cfg["embed_dim"],
        "vocab": t.get("vocab_size", 49408),
        "t_width": t["width"],
        "context": t.get("context_length", 77),
        "t_layers": t["layers"],
        "t_mlp": int(t["width"] * t.get("mlp_ratio", 4.0)),
    }
    wrong = {k: (dims[k], expected[k]) for k in dims if dims[k] != expected[k]}
    if wrong:
        raise ValueError(
            "checkpoint does not match the open_clip config (checkpoint, config): "
            f"{wrong}. HPS-v2.1 is ViT-H-14; for another architecture pass its open_clip JSON with --open-clip-config."
        )
    dims["v_heads"] = v["width"] // v.get("head_width", 64)  # open_clip: heads = width // head_width
    dims["t_heads"] = t.get("heads", 8)
    dims["image_size"] = dims["grid"] * dims["patch"]
    return dims


def _convert_block(take, src: str, dst: str, out: dict) -> None:
    """One open_clip ResidualAttentionBlock (pre-LN; nn.MultiheadAttention) -> CLIPEncoderLayer."""
    for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        for p in ("weight", "bias"):
            out[f"{dst}{b}.{p}"] = take(f"{src}{a}.{p}", f"{dst}{b}.{p}")
    # nn.MultiheadAttention fuses the projections: in_proj_weight is (3W, W) with rows [W_q; W_k; W_v].
    for p, suffix in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
        targets = [f"{dst}self_attn.{n}_proj.{suffix}" for n in "qkv"]
        q, k, v = take(f"{src}attn.{p}", *targets).chunk(3, dim=0)  # (3W, ...) -> 3 x (W, ...)
        out.update(zip(targets, (q, k, v)))


def convert_open_clip_state_dict(sd: dict, model_cfg: dict | None = None) -> tuple[dict, dict, dict]:
    """open_clip CLIP (ViT image tower) state dict -> (transformers CLIPModel state dict, dims, report).

    `report` maps every checkpoint key to the target keys made from it (or why it was dropped);
    a key the converter does not know raises instead of being dropped."""
    dims = open_clip_dims(sd, model_cfg or VIT_H_14)
    kt = KeyTaker(sd, "open_clip")
    take, out = kt.take, {}
    ve, te = "vision_model.embeddings.", "text_model.embeddings."
    out[ve + "patch_embedding.weight"] = take("visual.conv1.weight", ve + "patch_embedding.weight")  # no bias in either
    out[ve + "class_embedding"] = take("visual.class_embedding", ve + "class_embedding")
    out[ve + "position_embedding.weight"] = take("visual.positional_embedding", ve + "position_embedding.weight")
    for a, b in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                 ("ln_final", "text_model.final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{b}.{p}"] = take(f"{a}.{p}", f"{b}.{p}")
    for i in range(dims["v_layers"]):
        _convert_block(take, f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.", out)
    for i in range(dims["t_layers"]):
        _convert_block(take, f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", out)
    out[te + "token_embedding.weight"] = take("token_embedding.weight", te + "token_embedding.weight")
    out[te + "position_embedding.weight"] = take("positional_embedding", te + "position_embedding.weight")
    # open_clip projects with x @ proj, proj (width, embed); nn.Linear computes x @ weight.T.
    out["visual_projection.weight"] = take("visual.proj", "visual_projection.weight").t().contiguous()
    out["text_projection.weight"] = take("text_projection", "text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale", "logit_scale").reshape(())
    if "attn_mask" in sd:  # the causal mask buffer some open_clip versions saved; CLIPTextModel builds its own
        mask = kt.ignore("attn_mask", "causal mask buffer, rebuilt by CLIPTextModel")
        if tuple(mask.shape) != (dims["context"], dims["context"]):
            raise ValueError(f"attn_mask has shape {tuple(mask.shape)}, expected the causal ({dims['context']},)*2")
    return out, dims, kt.finish()


def clip_config(dims: dict, tokenizer):
    """transformers' CLIPConfig for the sizes read from the checkpoint."""
    from transformers import CLIPConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(
        text_config=dict(
            vocab_size=dims["vocab"], hidden_size=dims["t_width"], intermediate_size=dims["t_mlp"],
            num_hidden_layers=dims["t_layers"], num_attention_heads=dims["t_heads"],
            max_position_embeddings=dims["context"], hidden_act="gelu", layer_norm_eps=1e-5,
            projection_dim=dims["embed"], **ids,
        ),
        vision_config=dict(
            hidden_size=dims["v_width"], intermediate_size=dims["v_mlp"], num_hidden_layers=dims["v_layers"],
            num_attention_heads=dims["v_heads"], image_size=dims["image_size"], patch_size=dims["patch"],
            hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=dims["embed"],
        ),
        projection_dim=dims["embed"],
    )


def convert(checkpoint: str, out: str, tokenizer: str = LAION_CLIP_H, open_clip_config: str | None = None,
            overwrite: bool = False) -> str:
    """HPS_v2.1_compressed.pt -> a CLIPModel folder `out` (weights in the checkpoint's dtype); returns `out`."""
    check_out(out, overwrite)  # before minutes of loading: a used --out is refused now
    sd = load_checkpoint(checkpoint)
    converted, dims, _ = convert_open_clip_state_dict(sd, open_clip_model_cfg(open_clip_config))
    from transformers import AutoTokenizer, CLIPModel

    tok = AutoTokenizer.from_pretrained(tokenizer)
    # open_clip pools the text at argmax(token ids), i.e. at EOT because EOT has the largest id;
    # CLIPTextModel pools at the first eos_token_id. They agree iff EOT is the tokenizer's largest id.
    if tok.eos_token_id != len(tok) - 1 or len(tok) > dims["vocab"]:
        raise ValueError(
            f"tokenizer {tokenizer} does not fit: EOT id {tok.eos_token_id}, size {len(tok)}, "
            f"checkpoint vocabulary {dims['vocab']} (open_clip's pooling needs EOT to be the largest id)"
        )
    model = build_empty(CLIPModel, clip_config(dims, tok), converted, "HPS-v2.1")
    prepare_out(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_reward_json(out, "hps", "tools/convert_hps.py", checkpoint)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="HPS_v2.1_compressed.pt (open_clip state dict)")
    parser.add_argument("--out", required=True, help="output folder (transformers CLIPModel + tokenizer + reward.json)")
    parser.add_argument("--tokenizer", default=LAION_CLIP_H,
                        help=f"CLIP BPE tokenizer: folder or hub id (default {LAION_CLIP_H})")
    parser.add_argument("--open-clip-config", default=None,
                        help="open_clip model config JSON for an architecture other than ViT-H-14 (default: ViT-H-14)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    args = parser.parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, args.tokenizer, args.open_clip_config, args.overwrite))
    except (OSError, ValueError, KeyError) as e:  # a wrong file or folder: say so without a traceback
        parser.error(str(e))


if __name__ == "__main__":
    main()
