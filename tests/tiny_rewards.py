"""Tiny, randomly initialised reward models, built offline: the official formats and the converted folders.

Converted folders (what rewards.py loads; built by running the real converters in tools/):
    build_tiny_pickscore(dir)   -> dir   transformers CLIPModel + CLIPProcessor folder (as PickScore_v1)
    build_tiny_hps(dir)         -> dir   tools/convert_hps.py's output for a tiny HPS checkpoint
    build_tiny_imagereward(dir) -> dir   tools/convert_imagereward.py's output for a tiny ImageReward checkpoint
Official formats (what the converters read):
    write_tiny_hps_checkpoint(dir) -> .pt          HPS_v2.1_compressed.pt (open_clip key layout, {"state_dict": ...})
                                                   + open_clip_config.json + CLIP BPE tokenizer files
    write_tiny_imagereward_checkpoint(dir) -> .pt  ImageReward.pt (blip.visual_encoder.*, blip.text_encoder.*,
                                                   mlp.layers.*) + med_config.json + BERT WordPiece tokenizer files

The checkpoints are written with the key names, shapes and layouts of open_clip and BLIP/ImageReward
(not through the converters), so tests that convert and load them check the converters for real.

Sizes: widths 32 (ImageReward's ViT: 128 = 2 heads of BLIP's 64), 2 layers, 2 heads, 32x32 images
with 8x8 patches (16 patches + class token). Everything is seeded (`seed`), and the caller's global
RNG state is left untouched.

Use in tests:
    from tiny_rewards import build_tiny_hps
    hps = rewards.load_reward("hps", path=build_tiny_hps(tmp_path / "hps"))
or the session-scoped fixtures (built once per session):
    from tiny_rewards import tiny_pickscore_dir, tiny_hps_dir, tiny_imagereward_dir  # noqa: F401
From a shell:
    python tests/tiny_rewards.py /tmp/tiny_rewards     # writes pickscore/, hps/, imagereward/ (converted)
"""

import json
import math
import os
import sys
import tempfile

import pytest
import torch

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
sys.path.insert(0, TOOLS)

import convert_hps  # noqa: E402  (tools/convert_hps.py)
import convert_imagereward  # noqa: E402  (tools/convert_imagereward.py)

IMAGE_SIZE = 32
PATCH_SIZE = 8
WIDTH = 32  # CLIP towers, BERT text encoder
HEADS = 2
LAYERS = 2
EMBED_DIM = 16  # CLIP joint embedding
BLIP_VIT_WIDTH = 128  # BLIP's ViTs use 64-wide heads: 128 = 2 heads
IMAGEREWARD_HEAD = (1024, 128, 64, 16, 1)  # ImageReward's MLP widths after the 768 (here WIDTH) input
BERT_MAX_POSITIONS = 40  # >= ImageReward's max_length 35

_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "cube", "on", "the", "and", "with", "sign", "says")

# Tiny open_clip architecture in open_clip's own config format (open_clip_config.json / model_configs/*.json).
TINY_OPEN_CLIP_CFG = {
    "embed_dim": EMBED_DIM,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS,
                   "patch_size": PATCH_SIZE, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": None, "width": WIDTH, "heads": HEADS, "layers": LAYERS,
                 "mlp_ratio": 2.0},  # vocab_size: filled with the tokenizer's size
}


def tiny_clip_tokenizer():
    """CLIP byte-level BPE in CLIP's format: every printable ASCII character with and without the
    end-of-word suffix, merges for the words in `_WORDS`, and the two special tokens last (so, as in
    the real 49408-token vocabulary, <|endoftext|> has the largest id)."""
    from transformers import CLIPTokenizer

    symbols = [chr(c) for c in range(33, 127)]
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            merged = pieces[0] + pieces[1]
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def tiny_bert_tokenizer():
    """bert-base-uncased's layout in miniature: [PAD]=0, then [UNK] [CLS] [SEP] [MASK], characters,
    '##'-continuations and a few whole words (WordPiece; lower-casing)."""
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars if c.isalnum()] + [w for w in _WORDS if len(w) > 1]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True, model_max_length=512)


def _rand(g, *shape, scale=0.1):
    return torch.randn(*shape, generator=g) * scale


def _layer_norm(g, sd, prefix, width):
    sd[prefix + ".weight"] = 1.0 + _rand(g, width)
    sd[prefix + ".bias"] = _rand(g, width)


def _linear(g, sd, prefix, n_out, n_in, bias=True):
    sd[prefix + ".weight"] = _rand(g, n_out, n_in, scale=1.0 / math.sqrt(n_in))
    if bias:
        sd[prefix + ".bias"] = _rand(g, n_out)


def tiny_open_clip_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Random weights with open_clip's CLIP key names and shapes (VisionTransformer + text Transformer
    of ResidualAttentionBlocks with nn.MultiheadAttention's fused in_proj)."""
    g = torch.Generator().manual_seed(seed)
    v, t, E = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    sd = {}

    def block(prefix, width, mlp):
        _layer_norm(g, sd, prefix + "ln_1", width)
        _linear(g, sd, prefix + "attn.in_proj", 3 * width, width)  # -> in_proj.weight / in_proj.bias
        sd[prefix + "attn.in_proj_weight"] = sd.pop(prefix + "attn.in_proj.weight")
        sd[prefix + "attn.in_proj_bias"] = sd.pop(prefix + "attn.in_proj.bias")
        _linear(g, sd, prefix + "attn.out_proj", width, width)
        _layer_norm(g, sd, prefix + "ln_2", width)
        _linear(g, sd, prefix + "mlp.c_fc", mlp, width)
        _linear(g, sd, prefix + "mlp.c_proj", width, mlp)

    W, P, grid = v["width"], v["patch_size"], v["image_size"] // v["patch_size"]
    sd["visual.conv1.weight"] = _rand(g, W, 3, P, P, scale=1.0 / P)
    sd["visual.class_embedding"] = _rand(g, W)
    sd["visual.positional_embedding"] = _rand(g, grid * grid + 1, W)
    _layer_norm(g, sd, "visual.ln_pre", W)
    for i in range(v["layers"]):
        block(f"visual.transformer.resblocks.{i}.", W, int(W * v["mlp_ratio"]))
    _layer_norm(g, sd, "visual.ln_post", W)
    sd["visual.proj"] = _rand(g, W, E, scale=1.0 / math.sqrt(W))  # (width, embed): used as x @ proj

    Wt = t["width"]
    sd["token_embedding.weight"] = _rand(g, t["vocab_size"], Wt, scale=0.5)
    sd["positional_embedding"] = _rand(g, t["context_length"], Wt)
    for i in range(t["layers"]):
        block(f"transformer.resblocks.{i}.", Wt, int(Wt * t["mlp_ratio"]))
    _layer_norm(g, sd, "ln_final", Wt)
    sd["text_projection"] = _rand(g, Wt, E, scale=1.0 / math.sqrt(Wt))
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # CLIP's initial temperature
    return sd


def tiny_open_clip_cfg(vocab_size: int) -> dict:
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["text_cfg"]["vocab_size"] = vocab_size
    return cfg


def write_tiny_hps_checkpoint(directory, seed: int = 0) -> str:
    """HPS_v2.1_compressed.pt ({"state_dict": open_clip state dict}) + open_clip_config.json + the
    CLIP tokenizer in `directory`; returns the checkpoint's path."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    cfg = tiny_open_clip_cfg(len(tokenizer))
    checkpoint = os.path.join(directory, "HPS_v2.1_compressed.pt")
    torch.save({"state_dict": tiny_open_clip_state_dict(cfg, seed)}, checkpoint)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f, indent=2)
    tokenizer.save_pretrained(directory)
    return checkpoint


def build_tiny_hps(directory, seed: int = 0) -> str:
    """The converted HPS folder rewards.py loads: a tiny checkpoint run through tools/convert_hps.py."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_hps_checkpoint(tmp, seed)
        return convert_hps.convert(checkpoint, str(directory), tokenizer=tmp, overwrite=True,
                                   open_clip_config=os.path.join(tmp, "open_clip_config.json"))


def build_tiny_pickscore(directory, seed: int = 0) -> str:
    """A transformers CLIPModel folder with its CLIPProcessor, as PickScore_v1 (logit_scale.exp() = 100)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    directory = str(directory)
    tokenizer = tiny_clip_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=EMBED_DIM, **ids),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                           hidden_act="gelu", projection_dim=EMBED_DIM),
        projection_dim=EMBED_DIM,
        logit_scale_init_value=math.log(100.0),  # PickScore_v1's learned scale: exp = 100
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
        with torch.no_grad():  # transformers' init is tiny-std; widen it so embeddings differ across inputs
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def tiny_imagereward_state_dict(vocab_size: int, seed: int = 0) -> dict:
    """Random weights with ImageReward.pt's key names and shapes: BLIP's timm ViT, med.py's BertModel
    with cross-attention (and its saved position_ids buffer), BLIP's unused contrastive projections,
    and ImageReward's mlp.layers (Linear/Dropout indices 0, 2, 4, 6, 7)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    V, T, Wv, Wt = "blip.visual_encoder.", "blip.text_encoder.", BLIP_VIT_WIDTH, WIDTH
    grid = IMAGE_SIZE // PATCH_SIZE
    sd[V + "cls_token"] = _rand(g, 1, 1, Wv)
    sd[V + "pos_embed"] = _rand(g, 1, grid * grid + 1, Wv)
    sd[V + "patch_embed.proj.weight"] = _rand(g, Wv, 3, PATCH_SIZE, PATCH_SIZE, scale=1.0 / PATCH_SIZE)
    sd[V + "patch_embed.proj.bias"] = _rand(g, Wv)
    for i in range(LAYERS):
        b = f"{V}blocks.{i}."
        _layer_norm(g, sd, b + "norm1", Wv)
        _linear(g, sd, b + "attn.qkv", 3 * Wv, Wv)
        _linear(g, sd, b + "attn.proj", Wv, Wv)
        _layer_norm(g, sd, b + "norm2", Wv)
        _linear(g, sd, b + "mlp.fc1", 4 * Wv, Wv)
        _linear(g, sd, b + "mlp.fc2", Wv, 4 * Wv)
    _layer_norm(g, sd, V + "norm", Wv)

    sd[T + "embeddings.word_embeddings.weight"] = _rand(g, vocab_size, Wt, scale=0.5)
    sd[T + "embeddings.position_embeddings.weight"] = _rand(g, BERT_MAX_POSITIONS, Wt)
    sd[T + "embeddings.position_ids"] = torch.arange(BERT_MAX_POSITIONS).expand(1, -1).clone()
    _layer_norm(g, sd, T + "embeddings.LayerNorm", Wt)
    for i in range(LAYERS):
        b = f"{T}encoder.layer.{i}."
        for part, kv_width in (("attention", Wt), ("crossattention", Wv)):
            _linear(g, sd, b + part + ".self.query", Wt, Wt)
            _linear(g, sd, b + part + ".self.key", Wt, kv_width)
            _linear(g, sd, b + part + ".self.value", Wt, kv_width)
            _linear(g, sd, b + part + ".output.dense", Wt, Wt)
            _layer_norm(g, sd, b + part + ".output.LayerNorm", Wt)
        _linear(g, sd, b + "intermediate.dense", 2 * Wt, Wt)
        _linear(g, sd, b + "output.dense", Wt, 2 * Wt)
        _layer_norm(g, sd, b + "output.LayerNorm", Wt)
    _linear(g, sd, "blip.vision_proj", EMBED_DIM, Wv)
    _linear(g, sd, "blip.text_proj", EMBED_DIM, Wt)

    widths = (Wt,) + IMAGEREWARD_HEAD
    for n, j in enumerate((0, 2, 4, 6, 7)):  # nn.Sequential indices of the Linear layers (Dropouts between)
        _linear(g, sd, f"mlp.layers.{j}", widths[n + 1], widths[n])
    return sd


def tiny_med_config(vocab_size: int) -> dict:
    """med_config.json in BLIP's format, at tiny width."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": WIDTH, "initializer_range": 0.02, "intermediate_size": 2 * WIDTH,
        "layer_norm_eps": 1e-12, "max_position_embeddings": BERT_MAX_POSITIONS, "model_type": "bert",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 0, "type_vocab_size": 2,
        "vocab_size": vocab_size, "encoder_width": BLIP_VIT_WIDTH, "add_cross_attention": True,
    }


def write_tiny_imagereward_checkpoint(directory, seed: int = 0) -> str:
    """ImageReward.pt + med_config.json + the base BERT tokenizer (without [DEC]/[ENC]: the converter
    adds them, as ImageReward's init_tokenizer does to bert-base-uncased) in `directory`; returns the
    checkpoint's path."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    tokenizer = tiny_bert_tokenizer()
    vocab_size = len(tokenizer) + 2  # + [DEC] + [ENC], as 30522 + 2 = 30524 in ImageReward
    checkpoint = os.path.join(directory, "ImageReward.pt")
    torch.save(tiny_imagereward_state_dict(vocab_size, seed), checkpoint)
    with open(os.path.join(directory, "med_config.json"), "w") as f:
        json.dump(tiny_med_config(vocab_size), f, indent=2)
    tokenizer.save_pretrained(directory)
    return checkpoint


def build_tiny_imagereward(directory, seed: int = 0) -> str:
    """The converted ImageReward folder rewards.py loads: a tiny checkpoint run through
    tools/convert_imagereward.py."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_tiny_imagereward_checkpoint(tmp, seed)
        return convert_imagereward.convert(checkpoint, str(directory), med_config=os.path.join(tmp, "med_config.json"),
                                           tokenizer=tmp, overwrite=True)


@pytest.fixture(scope="session")
def tiny_pickscore_dir(tmp_path_factory) -> str:
    """Session-scoped tiny PickScore folder; import this name into a test module."""
    return build_tiny_pickscore(tmp_path_factory.mktemp("tiny_pickscore"))


@pytest.fixture(scope="session")
def tiny_hps_dir(tmp_path_factory) -> str:
    """Session-scoped tiny HPS-v2.1 folder; import this name into a test module."""
    return build_tiny_hps(tmp_path_factory.mktemp("tiny_hps"))


@pytest.fixture(scope="session")
def tiny_imagereward_dir(tmp_path_factory) -> str:
    """Session-scoped tiny ImageReward folder; import this name into a test module."""
    return build_tiny_imagereward(tmp_path_factory.mktemp("tiny_imagereward"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_rewards.py OUTPUT_DIR")
    root = sys.argv[1]
    for name, build in (("pickscore", build_tiny_pickscore), ("hps", build_tiny_hps),
                        ("imagereward", build_tiny_imagereward)):
        print(os.path.abspath(build(os.path.join(root, name))))
