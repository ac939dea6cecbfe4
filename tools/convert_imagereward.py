"""Convert ImageReward-v1.0 (ImageReward.pt, BLIP + MLP head) into transformers BLIP folders, once.

ImageReward (Xu et al. 2023) ships as ImageReward.pt, a state dict of its own code base: BLIP's
timm ViT-L/16 image encoder, BLIP's med.py BERT text encoder that cross-attends to the image
patches, and an MLP head on the [CLS] state. Its package cannot import here (see README, "Reward
models"). transformers' BlipVisionModel and BlipTextModel are ports of the same two networks (same
parameter names for the text encoder; timm's ViT maps one to one), so the weights are copied key by
key; rewards.py then loads them with from_pretrained. The equivalence is tested in
tests/test_rewards.py against ImageReward's forward re-derived in plain torch.

    hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir ckpt
    hf download bert-base-uncased --include "*.json" --include "*.txt" --local-dir bert-base-uncased
    python tools/convert_imagereward.py --checkpoint ckpt/ImageReward.pt --med-config ckpt/med_config.json \
        --tokenizer bert-base-uncased --out models/imagereward

The output folder (`--out`) holds:
    vision/             BlipVisionModel (config.json + model.safetensors)
    text/               BlipTextModel with cross-attention, no pooler (config.json + model.safetensors)
    head.safetensors    the MLP head: Linear layers "0.weight", "0.bias", "1.weight", ... in order
    tokenizer files     bert-base-uncased + "[DEC]" (bos) + "[ENC]", as ImageReward's init_tokenizer()
    reward.json         the marker rewards.py checks, with the score's mean/std and max_length
Load it with `rewards.load_reward("imagereward", "models/imagereward")`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from checkpoint_utils import (KeyTaker, build_empty, check_out, count_blocks, load_checkpoint, prepare_out,
                              write_reward_json)  # noqa: E402

# ImageReward-v1.0 standardises its raw MLP output with these constants (ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # tokenizer max_length of ImageReward's score()

# BLIP's configs/med_config.json, which ImageReward-v1.0 ships as its med_config.json (BERT-base
# with cross-attention; encoder_width is replaced by the ViT width at construction).
MED_CONFIG = {
    "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "vocab_size": 30524,
    "pad_token_id": 0, "add_cross_attention": True,
}
BLIP_VIT_HEAD_WIDTH = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16) both use 64-wide heads


def convert_imagereward_state_dict(sd: dict) -> tuple[dict, dict, dict]:
    """ImageReward.pt (keys blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) ->
    ({"vision": BlipVisionModel sd, "text": BlipTextModel sd, "head": [(weight, bias), ...]}, dims, report).

    BLIP's ViT is timm's (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm); its text encoder is med.py's BertModel, whose
    names transformers' BlipTextModel kept (it was ported from med.py)."""
    kt = KeyTaker(sd, "ImageReward")
    take = kt.take
    V, T = "blip.visual_encoder.", "blip.text_encoder."
    try:
        dims = {
            "v_width": sd[V + "cls_token"].shape[-1],
            "patch": sd[V + "patch_embed.proj.weight"].shape[-1],
            "v_tokens": sd[V + "pos_embed"].shape[1],  # grid^2 + 1
            "v_layers": count_blocks(sd, V + "blocks."),
            "v_mlp": sd[V + "blocks.0.mlp.fc1.weight"].shape[0],
            "vocab": sd[T + "embeddings.word_embeddings.weight"].shape[0],
            "t_width": sd[T + "embeddings.word_embeddings.weight"].shape[1],
            "t_positions": sd[T + "embeddings.position_embeddings.weight"].shape[0],
            "t_layers": count_blocks(sd, T + "encoder.layer."),
            "t_mlp": sd[T + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            "encoder_width": sd[T + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
        }
    except KeyError as e:
        raise ValueError(f"not an ImageReward checkpoint: missing {e}") from e
    grid = math.isqrt(dims["v_tokens"] - 1)
    if grid * grid + 1 != dims["v_tokens"] or dims["encoder_width"] != dims["v_width"]:
        raise ValueError(f"inconsistent ImageReward checkpoint: {dims}")
    dims["image_size"] = grid * dims["patch"]

    vision = {}
    vision["embeddings.class_embedding"] = take(V + "cls_token", "vision.embeddings.class_embedding")  # (1, 1, W) both
    vision["embeddings.position_embedding"] = take(V + "pos_embed", "vision.embeddings.position_embedding")
    for p in ("weight", "bias"):
        dst = f"embeddings.patch_embedding.{p}"
        vision[dst] = take(f"{V}patch_embed.proj.{p}", "vision." + dst)
        vision[f"post_layernorm.{p}"] = take(f"{V}norm.{p}", f"vision.post_layernorm.{p}")
    # timm's Attention and BlipAttention both split qkv as reshape(B, N, 3, heads, head_dim): same layout.
    block_names = (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"), ("attn.proj", "self_attn.projection"),
                   ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    for i in range(dims["v_layers"]):
        for a, b in block_names:
            for p in ("weight", "bias"):
                dst = f"encoder.layers.{i}.{b}.{p}"
                vision[dst] = take(f"{V}blocks.{i}.{a}.{p}", "vision." + dst)

    text = {}
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(dims["t_layers"]):
        for part in ("attention", "crossattention"):
            for n in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                names += [f"encoder.layer.{i}.{part}.{n}.{p}" for p in ("weight", "bias")]
        names += [f"encoder.layer.{i}.intermediate.dense.{p}" for p in ("weight", "bias")]
        names += [f"encoder.layer.{i}.output.{n}.{p}" for n in ("dense", "LayerNorm") for p in ("weight", "bias")]
    for n in names:
        text[n] = take(T + n, "text." + n)
    if T + "embeddings.position_ids" in sd:  # med.py saved its arange buffer; transformers rebuilds it
        pos = kt.ignore(T + "embeddings.position_ids", "arange buffer, rebuilt by BlipTextModel")
        if not torch.equal(pos.flatten().long(), torch.arange(pos.numel())):
            raise ValueError("blip.text_encoder.embeddings.position_ids is not arange: unexpected checkpoint")
    for k in [k for k in sd if k.startswith(("blip.vision_proj.", "blip.text_proj."))]:
        kt.ignore(k, "BLIP's contrastive projections; ImageReward's score does not use them")

    # The head: mlp.layers = Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear).
    # Dropout is inactive at eval and ImageReward comments out every ReLU, so the head is the chain
    # of its Linear layers, in index order.
    idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"mlp\.layers\.(\d+)\.weight$", k)] if m})
    head = [(take(f"mlp.layers.{j}.weight", f"head.{n}.weight"), take(f"mlp.layers.{j}.bias", f"head.{n}.bias"))
            for n, j in enumerate(idx)]
    widths = [dims["t_width"]] + [w.shape[0] for w, _ in head]
    if not head or any(w.shape[1] != widths[n] for n, (w, _) in enumerate(head)) or widths[-1] != 1:
        shapes = [tuple(w.shape) for w, _ in head]
        raise ValueError(f"ImageReward head mlp.layers does not chain {dims['t_width']} -> ... -> 1: {shapes}")
    dims["head_widths"] = widths
    return {"vision": vision, "text": text, "head": head}, dims, kt.finish()


def imagereward_tokenizer(path: str):
    """ImageReward's init_tokenizer(): bert-base-uncased plus bos '[DEC]' and an extra special '[ENC]'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


def blip_configs(dims: dict, med: dict, tokenizer, vision_heads: int | None = None):
    """(BlipVisionConfig, BlipTextConfig) for the sizes read from the checkpoint and med_config."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=dims["v_width"], intermediate_size=dims["v_mlp"], num_hidden_layers=dims["v_layers"],
        num_attention_heads=vision_heads or dims["v_width"] // BLIP_VIT_HEAD_WIDTH,
        image_size=dims["image_size"], patch_size=dims["patch"],
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT in BLIP: nn.GELU, LayerNorm(eps=1e-6)
    )
    text = BlipTextConfig(
        vocab_size=dims["vocab"], hidden_size=dims["t_width"], encoder_hidden_size=dims["v_width"],
        intermediate_size=dims["t_mlp"], num_hidden_layers=dims["t_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=dims["t_positions"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; rewards.py runs the forward with is_decoder=False
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    return vision, text


def convert(checkpoint: str, out: str, med_config: str | None = None, tokenizer: str = "bert-base-uncased",
            vision_heads: int | None = None, overwrite: bool = False) -> str:
    """ImageReward.pt -> the folder `out` described in the module docstring; returns `out`."""
    check_out(out, overwrite)  # before minutes of loading: a used --out is refused now
    med = dict(MED_CONFIG)
    if med_config is not None:
        with open(med_config) as f:
            med.update(json.load(f))
    parts, dims, _ = convert_imagereward_state_dict(load_checkpoint(checkpoint))
    from safetensors.torch import save_file
    from transformers import BlipTextModel, BlipVisionModel

    tok = imagereward_tokenizer(tokenizer)
    checks = {"hidden_size": dims["t_width"], "num_hidden_layers": dims["t_layers"], "intermediate_size": dims["t_mlp"],
              "vocab_size": dims["vocab"], "max_position_embeddings": dims["t_positions"]}
    wrong = {k: (v, med[k]) for k, v in checks.items() if med.get(k) != v}
    if wrong or len(tok) != dims["vocab"]:
        raise ValueError(
            f"ImageReward checkpoint vs med_config / tokenizer mismatch (checkpoint, config): {wrong}; "
            f"tokenizer size {len(tok)} (with [DEC], [ENC]) vs vocabulary {dims['vocab']}"
        )
    vision_cfg, text_cfg = blip_configs(dims, med, tok, vision_heads)
    vision = build_empty(BlipVisionModel, vision_cfg, parts["vision"], "ImageReward vision")
    text = build_empty(BlipTextModel, text_cfg, parts["text"], "ImageReward text", add_pooling_layer=False)
    prepare_out(out)
    vision.save_pretrained(os.path.join(out, "vision"))
    text.save_pretrained(os.path.join(out, "text"))
    head = {f"{n}.{p}": t.contiguous() for n, wb in enumerate(parts["head"]) for p, t in zip(("weight", "bias"), wb)}
    save_file(head, os.path.join(out, "head.safetensors"))
    tok.save_pretrained(out)
    write_reward_json(out, "imagereward", "tools/convert_imagereward.py", checkpoint,
                      mean=IMAGEREWARD_MEAN, std=IMAGEREWARD_STD, max_length=IMAGEREWARD_MAX_LENGTH)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="ImageReward.pt (state dict with blip.* and mlp.* keys)")
    parser.add_argument("--out", required=True,
                        help="output folder (vision/, text/, head.safetensors, tokenizer, reward.json)")
    parser.add_argument("--med-config", default=None,
                        help="ImageReward's med_config.json (default: BLIP's med_config, which ImageReward-v1.0 ships)")
    parser.add_argument("--tokenizer", default="bert-base-uncased",
                        help="BERT tokenizer: folder or hub id (default bert-base-uncased)")
    parser.add_argument("--vision-heads", type=int, default=None,
                        help="ViT attention heads (default width / 64, as BLIP's ViTs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --out")
    args = parser.parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, args.med_config, args.tokenizer, args.vision_heads, args.overwrite))
    except (OSError, ValueError, KeyError) as e:  # a wrong file or folder: say so without a traceback
        parser.error(str(e))


if __name__ == "__main__":
    main()
