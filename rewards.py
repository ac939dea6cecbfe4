"""Reward models by name: PickScore, HPS-v2.1, ImageReward, GenEval (HTTP client) and OCR.

The reward R(x) of Sec. 3-4 (the Boltzmann target q_i = softmax(beta R)_i of Eq. 5 and the GRPO
baseline of Eq. 28 both read it) and the evaluation metrics of Sec. 5 / App. D come from here. Every
reward has one signature, in the style of ddpo-pytorch's reward factories:

    fn(images, prompts, metadata=None) -> torch.FloatTensor (N,)

`images` is a float tensor (N, 3, H, W) in [0, 1] (the VAE decode after (x / 2 + 0.5).clamp(0, 1)),
`prompts` a list of N strings, `metadata` an optional list of N dicts (GenEval needs it). Scores
come back as float32 on `images.device`. A score that is not finite raises an error naming the
reward and the prompt: a reward is never silently replaced by 0 or a random number.

| name          | score                                                        | paper scale    |
| ------------- | ------------------------------------------------------------ | -------------- |
| `pickscore`   | logit_scale.exp() * cos(image, text), PickScore_v1 CLIP-H    | ~22-24         |
| `hps`         | cos(image, text), HPS-v2.1 open_clip ViT-H-14                | ~0.30-0.37     |
| `imagereward` | (BLIP + MLP head - 0.16717) / 1.03334, ImageReward-v1.0      | ~1.1-1.6       |
| `geneval`     | GenEval server: strict 0/1 (training) or fraction of criteria | 0-1            |
| `ocr`         | 1 - Levenshtein / max(len) vs the prompt's quoted text       | 0-1            |

Weights are never downloaded by tests; each loader takes a hub id (resolved through the Hugging
Face cache, so it also works offline once cached) or a local path, and fails with a message saying
which file is missing and where to get it:

    huggingface-cli download yuvalkirstain/PickScore_v1                  # PickScore model
    huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K        # its processor / HPS tokenizer
    huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt
    huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json
    huggingface-cli download bert-base-uncased                            # ImageReward's tokenizer
    pip install rapidocr-onnxruntime                                      # OCR engine (models in the wheel)

HPS-v2.1 and ImageReward ship as checkpoints of their own code bases (open_clip, BLIP); both need
torchvision, which this project does not depend on. Their weights are therefore converted, key by
key, into transformers' CLIPModel and BLIP modules; tests/test_rewards.py re-derives both forwards
in plain torch and checks the converted models against them.

Multi-reward training (App. D.2) z-scores each reward within its K-trajectory group and sums them
with weights: R = sum_m w_m (r_m - mean) / (std + eps). A single reward passes through unchanged.

    python -c "import rewards; print(rewards.REWARDS)"
    python -c "import rewards, torch; f = rewards.load_reward('pickscore', device='cuda'); \
print(f(torch.rand(2, 3, 512, 512, device='cuda'), ['a cat', 'a dog']))"
    python -m pytest -q tests/test_rewards.py
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections import Counter
from typing import Callable, Sequence

import torch

from tmpo import group_zscore

__all__ = [
    "REWARDS",
    "DEFAULT_PATHS",
    "DEFAULT_GENEVAL_URL",
    "load_reward",
    "load_rewards",
    "aggregate_rewards",
    "MultiReward",
    "PickScore",
    "HPSv21",
    "ImageReward",
    "GenEvalClient",
    "OCRReward",
    "RewardServerError",
    "convert_open_clip_state_dict",
    "open_clip_model_cfg",
    "convert_imagereward_state_dict",
    "clip_pixels",
    "levenshtein",
    "quoted_text",
    "ocr_similarity",
]

REWARDS = ("pickscore", "hps", "imagereward", "geneval", "ocr")

DEFAULT_GENEVAL_URL = "http://127.0.0.1:18085"  # port of Flow-GRPO's GenEval reward server
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # processor of PickScore_v1, tokenizer of HPS
DEFAULT_PATHS = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hps": "xswu/HPSv2",
    "imagereward": "THUDM/ImageReward",
    "geneval": DEFAULT_GENEVAL_URL,
    "ocr": None,
}
HPS_FILENAME = "HPS_v2.1_compressed.pt"
IMAGEREWARD_FILENAME = "ImageReward.pt"

# OpenAI CLIP's normalisation, used by open_clip (HPS) and by BLIP (ImageReward) alike.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ImageReward-v1.0 standardises its raw MLP output with these constants (ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # tokenizer max_length of ImageReward's score()

ZSCORE_EPS = 1e-4  # eps of the within-group z-score (App. D.2), as Flow-GRPO's advantage

RewardFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Shared checks and image handling
# ----------------------------------------------------------------------------------------------


def check_inputs(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> None:
    """Fail early, with what to fix, on anything a reward cannot score."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, 3, H, W); got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1]; got dtype {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise ValueError(f"need one prompt per image: {images.shape[0]} images, prompts={prompts!r:.200}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"images must lie in [0, 1] (decode with (x / 2 + 0.5).clamp(0, 1)); got min {lo:.4f}, max {hi:.4f}"
        )
    if metadata is not None and (len(metadata) != len(prompts) or not all(isinstance(m, dict) for m in metadata)):
        raise ValueError("metadata must be None or a list of one dict per image")


def check_finite(name: str, scores: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Raise, naming the reward and the prompt, if any score is NaN or infinite."""
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(
            f"reward '{name}' returned a non-finite score ({scores[i].item()}) for prompt {prompts[i]!r} "
            f"(index {i}; {len(bad)} of {len(scores)} scores are non-finite)"
        )
    return scores


def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] -> N RGB PIL images, quantised to uint8 as when saved to disk.

    The official scorers all read PIL images (saved PNG/JPEG files), so the rewards see exactly
    the 8-bit image a user would look at."""
    from PIL import Image

    arr = (images.detach().float() * 255).round().to(torch.uint8)  # (N, 3, H, W) uint8
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
    return [Image.fromarray(a) for a in arr]  # uint8 (H, W, 3) -> RGB


def clip_pixels(pil_images: list, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """torchvision's Compose([Resize(size, BICUBIC), CenterCrop(size), ToTensor(), Normalize(mean, std)])
    on PIL images, re-implemented without torchvision. This is the evaluation transform of both
    open_clip (HPS) and BLIP (ImageReward). Returns (N, 3, size, size) float32."""
    import numpy as np
    from PIL import Image

    out = []
    for im in pil_images:
        w, h = im.size
        # Resize(int): the shorter side becomes `size`, the longer keeps the aspect ratio (truncated).
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BICUBIC)
        # CenterCrop: torchvision rounds the offsets to the nearest integer.
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))  # (size, size, 3)
    x = torch.stack(out).permute(0, 3, 1, 2)  # (N, size, size, 3) -> (N, 3, size, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _chunks(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # No eps: a zero embedding gives NaN, which check_finite reports instead of hiding.
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# Local path or hub id
# ----------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _resolve_file(path: str, filename: str, hub_id: str) -> str:
    """Return a local file: `path` itself, `path/filename`, or `filename` from hub repo `path`.

    Hub downloads go through huggingface_hub's cache, so an id works offline once it is cached
    (HF_HUB_OFFLINE=1). Every failure says what is missing and how to get it."""
    path = os.fspath(path)
    get = f"huggingface-cli download {hub_id} {filename} --local-dir DIR"
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        file = os.path.join(path, filename)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no {filename}. Get it with: {get.replace('DIR', path)}")
        return file
    if not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"{path} does not exist (expected {filename}, a folder holding it, or a hub id such as {hub_id})"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=path, filename=filename)
    except Exception as e:  # network down, offline mode without cache, wrong id, gated repo...
        raise FileNotFoundError(
            f"could not get {filename} from hub repo '{path}' ({type(e).__name__}: {str(e)[:300]}). "
            f"Without network, download it elsewhere ({get}) and pass the local file or folder."
        ) from e


def _has_tokenizer_files(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _load_tokenizer(path: str, what: str, hub_default: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load the {what} tokenizer from '{path}' ({type(e).__name__}: {str(e)[:300]}). "
            f"Download it (huggingface-cli download {hub_default}) or pass a local folder with its tokenizer files."
        ) from e


def _load_checkpoint(file: str) -> dict:
    """A plain state dict of tensors, unwrapped from {"state_dict": ...} and a DDP "module." prefix.

    weights_only=True: these files are plain tensors, so nothing in them needs to execute code."""
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {file}: {type(e).__name__}: {str(e)[:300]}") from e
    if isinstance(ckpt, dict) and "state_dict" in ckpt and isinstance(ckpt["state_dict"], dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{file} is not a state dict of tensors")
    if ckpt and all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module."):]: v for k, v in ckpt.items()}
    return ckpt


class _KeyTaker:
    """Hands out checkpoint tensors and records that each key was used exactly once.

    `report[src]` is the list of target keys built from `src`, or "ignored: <why>"."""

    def __init__(self, state_dict: dict, what: str):
        self.sd, self.what, self.report = state_dict, what, {}

    def take(self, key: str, *targets: str) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.what} checkpoint has no key '{key}': is this the right file?")
        if key in self.report:
            raise RuntimeError(f"converter bug: '{key}' used twice")
        self.report[key] = list(targets)
        return self.sd[key]

    def ignore(self, key: str, why: str) -> torch.Tensor:
        if key in self.report:
            raise RuntimeError(f"converter bug: '{key}' used twice")
        self.report[key] = f"ignored: {why}"
        return self.sd[key]

    def finish(self) -> dict:
        left = sorted(set(self.sd) - set(self.report))
        if left:
            raise ValueError(
                f"{self.what} checkpoint has {len(left)} key(s) the converter does not know, e.g. {left[:8]}; "
                "refusing to drop weights silently"
            )
        return self.report


def _materialize(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Load `state_dict` into a module built on the meta device (no random init of ~1B params)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    # position_ids are arange buffers that transformers builds itself (non-persistent).
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: converted weights do not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
    meta = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if meta:
        raise ValueError(f"{what}: tensors left uninitialised: {meta[:8]}")


def _empty_init():
    from accelerate import init_empty_weights

    return init_empty_weights()  # parameters on meta, buffers real


# ----------------------------------------------------------------------------------------------
# PickScore
# ----------------------------------------------------------------------------------------------


class PickScore:
    """PickScore_v1 (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    score = logit_scale.exp() * cos(image, text); logit_scale.exp() = 100 for PickScore_v1, so
    scores are 100 x cosine (paper tables: ~22-24)."""

    name = "pickscore"

    def __init__(self, model, processor, batch_size: int = 32):
        self.model, self.processor, self.batch_size = model.eval().requires_grad_(False), processor, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        m = self.model
        device, dtype = m.logit_scale.device, m.visual_projection.weight.dtype
        out = []
        for sl in _chunks(len(prompts), self.batch_size):
            pixels = self.processor.image_processor(images=to_pil(images[sl]), return_tensors="pt")["pixel_values"]
            text = self.processor.tokenizer(
                list(prompts[sl]), padding=True, truncation=True, max_length=77, return_tensors="pt"
            )
            img = m.visual_projection(m.vision_model(pixel_values=pixels.to(device, dtype)).pooler_output)
            txt = m.text_projection(
                m.text_model(
                    input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
                ).pooler_output
            )
            cos = (_l2_normalize(img.float()) * _l2_normalize(txt.float())).sum(-1)  # (n,)
            out.append(m.logit_scale.float().exp() * cos)
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_pickscore(path=None, device="cpu", dtype=torch.float32, processor_path=None, batch_size: int = 32) -> PickScore:
    """PickScore from a transformers CLIPModel folder or hub id (default yuvalkirstain/PickScore_v1).

    The processor comes from `processor_path`; if not given, from the model folder when it holds
    processor files, else from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (as PickScore's own example)."""
    from transformers import CLIPModel, CLIPProcessor

    path = os.fspath(path or DEFAULT_PATHS["pickscore"])
    if os.path.isdir(path):
        weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
        if not os.path.isfile(os.path.join(path, "config.json")) or not any(
            os.path.isfile(os.path.join(path, w)) for w in weights
        ):
            raise FileNotFoundError(
                f"{path} is not a transformers CLIPModel folder (needs config.json and model.safetensors). "
                f"Get PickScore with: huggingface-cli download {DEFAULT_PATHS['pickscore']} --local-dir {path}"
            )
    elif not _HUB_ID.match(path):
        raise FileNotFoundError(
            f"{path} does not exist (expected a CLIPModel folder or a hub id such as {DEFAULT_PATHS['pickscore']})"
        )
    if processor_path is None:
        # preprocessor_config.json (transformers 4) or processor_config.json (transformers 5) holds the image settings.
        has_processor = _has_tokenizer_files(path) and any(
            os.path.isfile(os.path.join(path, n)) for n in ("preprocessor_config.json", "processor_config.json")
        )
        processor_path = path if has_processor else LAION_CLIP_H
    try:
        model = CLIPModel.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load PickScore from '{path}' ({type(e).__name__}: {str(e)[:300]}). "
            f"Download it (huggingface-cli download {DEFAULT_PATHS['pickscore']}) or pass a local folder."
        ) from e
    try:
        processor = CLIPProcessor.from_pretrained(processor_path)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load the PickScore processor from '{processor_path}' ({type(e).__name__}: {str(e)[:300]}). "
            f"Download it (huggingface-cli download {LAION_CLIP_H}) or pass processor_path=<local folder>."
        ) from e
    return PickScore(model.to(device), processor, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# HPS-v2.1: open_clip ViT-H-14 checkpoint -> transformers CLIPModel
# ----------------------------------------------------------------------------------------------

# open_clip's ViT-H-14 model config (open_clip/model_configs/ViT-H-14.json), with open_clip's
# defaults written out: mlp_ratio 4.0, nn.GELU (not QuickGELU), LayerNorm eps 1e-5.
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24, "mlp_ratio": 4.0},
}


def open_clip_model_cfg(folder: str | None = None, model_cfg: dict | None = None) -> dict:
    """The open_clip architecture: `model_cfg` if given, else `folder/open_clip_config.json` (open_clip's
    hub format, {"model_cfg": {...}}) if present, else ViT-H-14 (HPS-v2.1's architecture)."""
    if model_cfg is None and folder is not None and os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        with open(os.path.join(folder, "open_clip_config.json")) as f:
            model_cfg = json.load(f)
        model_cfg = model_cfg.get("model_cfg", model_cfg)
    return model_cfg if model_cfg is not None else VIT_H_14


def _count_blocks(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    if not idx or idx != set(range(max(idx) + 1)):
        raise ValueError(f"checkpoint has no contiguous '{prefix}N.' blocks (found {sorted(idx)[:10]})")
    return len(idx)


def _open_clip_dims(sd: dict, model_cfg: dict) -> dict:
    """Read every size from the checkpoint, check it against `model_cfg`, take head counts from it."""
    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    try:
        conv = sd["visual.conv1.weight"]  # (width, 3, patch, patch)
        n_pos = sd["visual.positional_embedding"].shape[0]  # grid^2 + 1
        dims = {
            "v_width": conv.shape[0],
            "patch": conv.shape[-1],
            "grid": math.isqrt(n_pos - 1),
            "v_layers": _count_blocks(sd, "visual.transformer.resblocks."),
            "v_mlp": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "embed": sd["visual.proj"].shape[1],  # visual.proj is (width, embed_dim)
            "vocab": sd["token_embedding.weight"].shape[0],
            "t_width": sd["token_embedding.weight"].shape[1],
            "context": sd["positional_embedding"].shape[0],
            "t_layers": _count_blocks(sd, "transformer.resblocks."),
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
            f"{wrong}. HPS-v2.1 is ViT-H-14; for another architecture put its open_clip_config.json next to the file."
        )
    dims["v_heads"] = v["width"] // v.get("head_width", 64)  # open_clip: heads = width // head_width
    dims["t_heads"] = t.get("heads", 8)
    dims["image_size"] = dims["grid"] * dims["patch"]
    return dims


def _convert_open_clip_block(take, src: str, dst: str, out: dict) -> None:
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
    dims = _open_clip_dims(sd, model_cfg or VIT_H_14)
    kt = _KeyTaker(sd, "open_clip")
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
        _convert_open_clip_block(take, f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.", out)
    for i in range(dims["t_layers"]):
        _convert_open_clip_block(take, f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.", out)
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


def _clip_config(dims: dict, tokenizer):
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


class HPSv21:
    """HPS-v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

    score = cos(image, text) (hpsv2's score is image_features @ text_features of normalised
    features, without the logit scale; paper: ~0.30-0.37)."""

    name = "hps"

    def __init__(self, model, tokenizer, image_size: int, context_length: int, batch_size: int = 32):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.image_size, self.context_length, self.batch_size = image_size, context_length, batch_size

    def embed(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised image and text embeddings (open_clip's encode_image / encode_text)."""
        m = self.model
        device, dtype = m.logit_scale.device, m.visual_projection.weight.dtype
        img = m.visual_projection(m.vision_model(pixel_values=pixels.to(device, dtype)).pooler_output)
        # No attention mask, as open_clip: the causal mask alone decides what the EOT token sees,
        # so the padding after it cannot change the pooled state.
        txt = m.text_projection(m.text_model(input_ids=input_ids.to(device)).pooler_output)
        return img, txt

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        # open_clip's tokenizer pads to the context length and ends every row with EOT, truncating long prompts.
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        out = []
        for sl in _chunks(len(prompts), self.batch_size):
            pixels = clip_pixels(to_pil(images[sl]), self.image_size)
            img, txt = self.embed(pixels, self.tokenize(prompts[sl]))
            out.append((_l2_normalize(img.float()) * _l2_normalize(txt.float())).sum(-1))  # (n,) cosine
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_hps(path=None, device="cpu", dtype=torch.float32, processor_path=None, model_cfg=None,
             batch_size: int = 32) -> HPSv21:
    """HPS-v2.1 from HPS_v2.1_compressed.pt: a file, a folder holding it, or a hub id (xswu/HPSv2).

    The CLIP BPE tokenizer comes from `processor_path`, else from the checkpoint's folder when it holds
    tokenizer files, else from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the same tokenizer open_clip uses).
    The architecture is ViT-H-14 unless the folder has an open_clip_config.json or `model_cfg` is given."""
    from transformers import CLIPModel

    file = _resolve_file(path or DEFAULT_PATHS["hps"], HPS_FILENAME, DEFAULT_PATHS["hps"])
    folder = os.path.dirname(os.path.abspath(file))
    if processor_path is None:
        processor_path = folder if _has_tokenizer_files(folder) else LAION_CLIP_H
    tokenizer = _load_tokenizer(processor_path, "HPS (CLIP BPE)", LAION_CLIP_H)
    sd = _load_checkpoint(file)
    converted, dims, _ = convert_open_clip_state_dict(sd, open_clip_model_cfg(folder, model_cfg))
    # open_clip pools the text at argmax(token ids), i.e. at EOT because EOT has the largest id;
    # CLIPTextModel pools at the first eos_token_id. They agree iff EOT is the tokenizer's largest id.
    if tokenizer.eos_token_id != len(tokenizer) - 1 or len(tokenizer) > dims["vocab"]:
        raise ValueError(
            f"tokenizer at {processor_path} does not fit: EOT id {tokenizer.eos_token_id}, size {len(tokenizer)}, "
            f"checkpoint vocabulary {dims['vocab']} (open_clip's pooling needs EOT to be the largest id)"
        )
    with _empty_init():
        model = CLIPModel(_clip_config(dims, tokenizer))
    _materialize(model, {k: v.to(dtype) for k, v in converted.items()}, "HPS-v2.1")
    return HPSv21(model.to(device), tokenizer, dims["image_size"], dims["context"], batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP (ViT + BERT with cross-attention) + MLP head -> transformers BLIP modules
# ----------------------------------------------------------------------------------------------

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
    kt = _KeyTaker(sd, "ImageReward")
    take = kt.take
    V, T = "blip.visual_encoder.", "blip.text_encoder."
    try:
        dims = {
            "v_width": sd[V + "cls_token"].shape[-1],
            "patch": sd[V + "patch_embed.proj.weight"].shape[-1],
            "v_tokens": sd[V + "pos_embed"].shape[1],  # grid^2 + 1
            "v_layers": _count_blocks(sd, V + "blocks."),
            "v_mlp": sd[V + "blocks.0.mlp.fc1.weight"].shape[0],
            "vocab": sd[T + "embeddings.word_embeddings.weight"].shape[0],
            "t_width": sd[T + "embeddings.word_embeddings.weight"].shape[1],
            "t_positions": sd[T + "embeddings.position_embeddings.weight"].shape[0],
            "t_layers": _count_blocks(sd, T + "encoder.layer."),
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


def _build_head(head: list, dtype=torch.float32) -> torch.nn.Sequential:
    layers = []
    for w, b in head:
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w)
        lin.bias.data.copy_(b)
        layers.append(lin)
    return torch.nn.Sequential(*layers).to(dtype)


def _imagereward_tokenizer(path: str):
    """ImageReward's init_tokenizer(): bert-base-uncased plus bos '[DEC]' and an extra special '[ENC]'."""
    tok = _load_tokenizer(path, "ImageReward (BERT)", "bert-base-uncased")
    base = len(tok)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_tokens(["[ENC]"], special_tokens=True)
    if len(tok) != base + 2 and len(tok) != base:
        raise ValueError("unexpected tokenizer: could not add [DEC] and [ENC]")
    return tok


class ImageReward:
    """ImageReward-v1.0 (Xu et al. 2023): BLIP ViT-L image encoder, BERT text encoder that
    cross-attends to the image patches, and an MLP on the [CLS] state; output standardised as
    (raw - 0.16717362830052426) / 1.0333394966054072 (paper: ~1.1-1.6).

    Text is tokenized as ImageReward's score() does: padding "max_length", truncation, max_length
    35, starting with [CLS]. (BLIP's retrieval/ITM code swaps the first token for [ENC];
    ImageReward's inference and training code do not, so neither does this.)"""

    name = "imagereward"

    def __init__(self, vision, text, head, tokenizer, image_size: int, batch_size: int = 32):
        self.vision, self.text = vision.eval().requires_grad_(False), text.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer, self.image_size, self.batch_size = tokenizer, image_size, batch_size

    def tokenize(self, prompts: Sequence[str]) -> dict:
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt"
        )

    def raw_score(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The MLP output before standardisation, (n,)."""
        device, dtype = self.vision.post_layernorm.weight.device, self.vision.post_layernorm.weight.dtype
        image_embeds = self.vision(pixel_values=pixels.to(device, dtype)).last_hidden_state  # (n, 1 + grid^2, Wv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        # is_decoder=False: bidirectional self-attention, then cross-attention to the patches
        # (med.py's BertModel in mode "multimodal").
        hidden = self.text(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, is_decoder=False,
        ).last_hidden_state  # (n, 35, Wt)
        return self.head(hidden[:, 0].float()).squeeze(-1)  # [CLS] state -> (n,)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        out = []
        for sl in _chunks(len(prompts), self.batch_size):
            tok = self.tokenize(prompts[sl])
            raw = self.raw_score(clip_pixels(to_pil(images[sl]), self.image_size), tok["input_ids"], tok["attention_mask"])
            out.append((raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD)
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_imagereward(path=None, device="cpu", dtype=torch.float32, tokenizer_path=None, vision_heads=None,
                     batch_size: int = 32) -> ImageReward:
    """ImageReward from ImageReward.pt: a file, a folder holding it, or a hub id (THUDM/ImageReward).

    Text-encoder settings come from med_config.json next to the file if present (else BLIP's
    med_config); the tokenizer from `tokenizer_path`, else the folder if it holds tokenizer files,
    else bert-base-uncased. ViT heads default to width / 64 (BLIP's ViTs)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    file = _resolve_file(path or DEFAULT_PATHS["imagereward"], IMAGEREWARD_FILENAME, DEFAULT_PATHS["imagereward"])
    folder = os.path.dirname(os.path.abspath(file))
    med = dict(MED_CONFIG)
    if os.path.isfile(os.path.join(folder, "med_config.json")):
        with open(os.path.join(folder, "med_config.json")) as f:
            med.update(json.load(f))
    tokenizer = _imagereward_tokenizer(tokenizer_path or (folder if _has_tokenizer_files(folder) else "bert-base-uncased"))
    parts, dims, _ = convert_imagereward_state_dict(_load_checkpoint(file))
    checks = {"hidden_size": dims["t_width"], "num_hidden_layers": dims["t_layers"], "intermediate_size": dims["t_mlp"],
              "vocab_size": dims["vocab"], "max_position_embeddings": dims["t_positions"]}
    wrong = {k: (v, med[k]) for k, v in checks.items() if med.get(k) != v}
    if wrong or len(tokenizer) != dims["vocab"]:
        raise ValueError(
            f"ImageReward checkpoint vs med_config / tokenizer mismatch (checkpoint, config): {wrong}; "
            f"tokenizer size {len(tokenizer)} vs vocabulary {dims['vocab']}"
        )
    heads = vision_heads or dims["v_width"] // BLIP_VIT_HEAD_WIDTH
    vision_config = BlipVisionConfig(
        hidden_size=dims["v_width"], intermediate_size=dims["v_mlp"], num_hidden_layers=dims["v_layers"],
        num_attention_heads=heads, image_size=dims["image_size"], patch_size=dims["patch"],
        hidden_act="gelu", layer_norm_eps=1e-6,  # timm ViT in BLIP: nn.GELU, LayerNorm(eps=1e-6)
    )
    text_config = BlipTextConfig(
        vocab_size=dims["vocab"], hidden_size=dims["t_width"], encoder_hidden_size=dims["v_width"],
        intermediate_size=dims["t_mlp"], num_hidden_layers=dims["t_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=dims["t_positions"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; the forward runs with is_decoder=False
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    with _empty_init():
        vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    _materialize(vision, {k: v.to(dtype) for k, v in parts["vision"].items()}, "ImageReward vision")
    _materialize(text, {k: v.to(dtype) for k, v in parts["text"].items()}, "ImageReward text")
    head = _build_head(parts["head"])  # float32, as ImageReward's .float() before the MLP
    return ImageReward(vision.to(device), text.to(device), head.to(device), tokenizer, dims["image_size"], batch_size)


# ----------------------------------------------------------------------------------------------
# GenEval: client of Flow-GRPO's GenEval reward server
# ----------------------------------------------------------------------------------------------


class RewardServerError(RuntimeError):
    """The reward server stayed unreachable or kept failing."""


class GenEvalClient:
    """Client for the GenEval scoring server of Flow-GRPO (github.com/yifan123/reward-server,
    app_geneval.py: Mask2Former detector + CLIP colour classifier behind a Flask POST on "/").

    Protocol: POST a pickled {"images": [JPEG bytes], "meta_datas": [GenEval metadata dicts],
    "only_strict": bool}; the reply is a pickled {"scores", "rewards", "strict_rewards",
    "group_rewards", "group_strict_rewards"}, one entry per image (HTTP 500 + traceback on error).
    "strict_rewards" is 1 when every criterion holds exactly (counts equal), "scores" the fraction
    of criteria met, "rewards" the original GenEval verdict (skipped when only_strict).

    strict=True (training): strict 0/1 rewards, and only_strict so the server skips the lenient
    check. strict=False (evaluation): the fraction of criteria met. (Flow-GRPO itself trains on
    "scores"; the TMPO setup, App. D, trains on the strict reward.)

    SECURITY: the reply is unpickled, and unpickling runs whatever code the sender chose. Only
    point this at a server you run yourself, on a network you trust (default 127.0.0.1:18085).

    Each request has a timeout; connection errors, timeouts and HTTP 5xx are retried with
    exponential backoff (backoff, 2 backoff, 4 backoff, ...); then RewardServerError names the URL."""

    name = "geneval"

    def __init__(self, url: str = DEFAULT_GENEVAL_URL, strict: bool = True, timeout: float = 120.0,
                 retries: int = 5, backoff: float = 1.0, batch_size: int = 64):
        self.url, self.strict, self.timeout = url, strict, timeout
        self.retries, self.backoff, self.batch_size = retries, backoff, batch_size

    def _post(self, body: bytes) -> bytes:
        import requests

        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = requests.post(self.url, data=body, timeout=self.timeout,
                                  headers={"Content-Type": "application/octet-stream"})
            except (requests.ConnectionError, requests.Timeout) as e:
                last = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if r.status_code == 200:
                return r.content
            lines = r.content.decode("utf-8", "replace").strip().splitlines()
            last = f"HTTP {r.status_code}: {lines[-1][:300] if lines else '(empty body)'}"
            if r.status_code < 500:  # a client error: retrying the same request cannot help
                break
        raise RewardServerError(
            f"GenEval server at {self.url} failed after {attempt + 1} attempt(s); last error: {last}. "
            "Start Flow-GRPO's GenEval reward server (reward-server/app_geneval.py) there, or pass its address "
            "(--geneval-url)."
        )

    def query(self, images: torch.Tensor, metadata: Sequence[dict]) -> dict:
        """All per-image lists the server returns: {"scores", "rewards", "strict_rewards"}."""
        import pickle

        result = {"scores": [], "rewards": [], "strict_rewards": []}
        for sl in _chunks(len(metadata), self.batch_size):
            jpegs = []
            for im in to_pil(images[sl]):
                buf = io.BytesIO()
                im.save(buf, format="JPEG")  # PIL's default quality 75, as Flow-GRPO's client
                jpegs.append(buf.getvalue())
            body = pickle.dumps({"images": jpegs, "meta_datas": list(metadata[sl]), "only_strict": self.strict})
            reply = pickle.loads(self._post(body))  # trusted server only: see the class docstring
            n = len(jpegs)
            if not isinstance(reply, dict) or any(len(reply.get(k, ())) != n for k in result):
                raise RewardServerError(
                    f"GenEval server at {self.url} sent a malformed reply for {n} images: {str(reply)[:300]}"
                )
            for k in result:
                result[k] += [float(v) for v in reply[k]]
        return result

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        if metadata is None or any(k not in m for m in metadata for k in ("tag", "prompt", "include")):
            raise ValueError(
                "the geneval reward needs each prompt's GenEval metadata (a dict with 'tag', 'prompt', 'include', "
                "as in GenEval's evaluation_metadata.jsonl)"
            )
        details = self.query(images, metadata)
        scores = torch.tensor(details["strict_rewards" if self.strict else "scores"], dtype=torch.float32)
        return check_finite(self.name, scores.to(images.device), prompts)


# ----------------------------------------------------------------------------------------------
# OCR: 1 - normalised edit distance to the quoted text
# ----------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def quoted_text(prompt: str) -> str:
    """The text to render: what stands between the first pair of double quotes (Flow-GRPO's OCR prompts,
    e.g. 'A neon sign reading "OPEN LATE" above a door')."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise ValueError(
            "the ocr reward needs the target text in double quotes in the prompt, "
            f"e.g. 'a sign that says \"hello\"'; got {prompt!r}"
        )
    return parts[1]


def ocr_similarity(recognized: str, target: str) -> float:
    """1 - Levenshtein(recognized, target) / max(len): 1 for an exact match, 0 for nothing in common.

    Both strings are lower-cased and stripped of whitespace first, as Flow-GRPO's OCR reward does
    (the recognizer splits lines and words arbitrarily). Unlike Flow-GRPO, extra recognised
    characters are not forgiven (it scores 1 whenever the target is a substring): normalising by
    the longer string is the standard NED and penalises spurious text."""
    a, b = "".join(recognized.lower().split()), "".join(target.lower().split())
    if not b:
        raise ValueError("empty OCR target text")
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


class OCRReward:
    """OCR accuracy with RapidOCR (PaddleOCR's PP-OCRv4 detector + recognizer as ONNX models shipped
    inside the rapidocr-onnxruntime wheel: runs offline, on CPU). The recognised lines are
    concatenated in reading order and compared with the prompt's quoted text."""

    name = "ocr"

    def __init__(self, engine=None):
        if engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as e:
                raise ImportError(
                    "the ocr reward needs an OCR engine: pip install rapidocr-onnxruntime "
                    "(it bundles its PP-OCRv4 models and works offline; needs libgl1 for opencv on slim images)"
                ) from e
            engine = RapidOCR()
        self.engine = engine

    def recognize(self, pil_image) -> str:
        result, _ = self.engine(pil_image)  # [[box, text, confidence], ...] or None when nothing is found
        return "".join(text for _, text, _ in (result or []))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        targets = [quoted_text(p) for p in prompts]  # before any OCR work: a bad prompt fails at once
        scores = [ocr_similarity(self.recognize(im), t) for im, t in zip(to_pil(images), targets)]
        return check_finite(self.name, torch.tensor(scores, dtype=torch.float32).to(images.device), prompts)


# ----------------------------------------------------------------------------------------------
# Factory and multi-reward aggregation (App. D.2)
# ----------------------------------------------------------------------------------------------


def load_reward(name: str, path=None, device="cpu", dtype=torch.float32, **kw) -> RewardFn:
    """The reward `name` as a callable fn(images, prompts, metadata=None) -> (N,) float32.

    `path`: hub id or local path of the weights (geneval: the server URL; ocr: none). Extra
    keywords go to the reward: pickscore/hps processor_path, imagereward tokenizer_path,
    geneval strict/timeout/retries/backoff, batch_size for all model-based rewards."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward '{name}'; known rewards: {', '.join(REWARDS)}")
    if name == "pickscore":
        return load_pickscore(path, device=device, dtype=dtype, **kw)
    if name == "hps":
        return load_hps(path, device=device, dtype=dtype, **kw)
    if name == "imagereward":
        return load_imagereward(path, device=device, dtype=dtype, **kw)
    if name == "geneval":
        return GenEvalClient(url=path or DEFAULT_GENEVAL_URL, **kw)
    if path is not None:
        raise ValueError("the ocr reward takes no path (its models ship with rapidocr-onnxruntime)")
    return OCRReward(**kw)


def _parse_list(value) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",")]
    return list(value)


def _weights(names: Sequence[str], weights) -> dict:
    if weights is None:
        return {n: 1.0 for n in names}
    if isinstance(weights, dict):
        if set(weights) != set(names):
            raise ValueError(f"weights are for {sorted(weights)} but the rewards are {list(names)}")
        return {n: float(weights[n]) for n in names}
    w = _parse_list(weights)
    if len(w) != len(names):
        raise ValueError(f"{len(w)} weight(s) {w} for {len(names)} reward(s) {list(names)}: give one weight per reward")
    return {n: float(x) for n, x in zip(names, w)}


def _check_single_weight(w: dict) -> None:
    (name, weight), = w.items()
    if weight != 1.0:
        raise ValueError(
            f"a single reward ({name}) passes through unchanged; its weight {weight} would have no effect: use 1"
        )


def aggregate_rewards(scores: dict, weights=None) -> torch.Tensor:
    """Combine rewards {name: (G, K)} into R (G, K), the last dimension being the group of K
    trajectories of one prompt (App. D.2):

        R = sum_m w_m * (r_m - mean_K r_m) / (std_K r_m + eps)      (population std, eps = 1e-4)

    so rewards on different scales (PickScore ~22, HPS ~0.3) weigh as the weights say. A single
    reward is returned unchanged: the advantage (Eq. 5 with its reward temperature, or GRPO's
    Eq. 28) already handles its scale, so its weight must be 1."""
    names = list(scores)
    if not names:
        raise ValueError("no rewards to aggregate")
    w = _weights(names, weights)
    if len(names) == 1:
        _check_single_weight(w)
        return scores[names[0]]
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"rewards must share the (G, K) shape: {shapes}")
    return sum(w[n] * group_zscore(scores[n].float(), eps=ZSCORE_EPS, dim=-1) for n in names)  # App. D.2


class MultiReward:
    """Several rewards on the same images: returns the raw scores per reward and their aggregate.

    __call__(images, prompts, metadata=None, group_size=None) -> (raw {name: (N,)}, total (N,)).
    Images are group-major (as tree_sampler's Rollout.x0): rows g*K ... g*K + K - 1 are the K
    trajectories of prompt g, and `group_size` = K (needed for more than one reward)."""

    def __init__(self, rewards: dict, weights=None):
        self.rewards = dict(rewards)
        self.weights = _weights(list(self.rewards), weights)
        if len(self.rewards) == 1:
            _check_single_weight(self.weights)

    @property
    def names(self) -> list:
        return list(self.rewards)

    def __call__(self, images, prompts, metadata=None, group_size: int | None = None):
        raw = {n: fn(images, prompts, metadata) for n, fn in self.rewards.items()}
        if len(raw) == 1:
            return raw, next(iter(raw.values()))
        if group_size is None or group_size < 1 or len(prompts) % group_size:
            raise ValueError(
                f"pass group_size=K (trajectories per prompt) dividing the batch of {len(prompts)}: each reward is "
                f"z-scored within its group before the weighted sum (App. D.2); got {group_size}"
            )
        for g in range(0, len(prompts), group_size):
            if len(set(prompts[g:g + group_size])) != 1:
                raise ValueError(
                    f"rows {g}..{g + group_size - 1} mix prompts: images must be group-major with group_size={group_size}"
                )
        grouped = {n: r.reshape(-1, group_size) for n, r in raw.items()}  # (N,) -> (G, K)
        return raw, aggregate_rewards(grouped, self.weights).reshape(-1)  # (G, K) -> (N,)


def load_rewards(names, weights=None, paths=None, device="cpu", dtype=torch.float32, reward_kwargs=None) -> MultiReward:
    """MultiReward from "pickscore,hps,imagereward"-style names and "1,1,1"-style weights.

    `paths`: {name: path}, or a comma list aligned with names (empty entries = default);
    `reward_kwargs`: {name: {keyword: value}} passed to each loader."""
    names = _parse_list(names)
    dupes = [n for n, c in Counter(names).items() if c > 1]
    if dupes or not names or "" in names:
        raise ValueError(f"reward names must be distinct and non-empty: {names}")
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known rewards: {', '.join(REWARDS)}")
    w = _weights(names, weights)
    if paths is None:
        paths = {}
    elif not isinstance(paths, dict):
        p = _parse_list(paths)
        if len(p) != len(names):
            raise ValueError(f"{len(p)} path(s) for {len(names)} reward(s): give one per reward (empty = default)")
        paths = {n: (x or None) for n, x in zip(names, p)}
    extra = set(paths) - set(names)
    if extra:
        raise ValueError(f"paths given for rewards not loaded: {sorted(extra)}")
    reward_kwargs = reward_kwargs or {}
    rewards = {n: load_reward(n, paths.get(n), device=device, dtype=dtype, **reward_kwargs.get(n, {})) for n in names}
    return MultiReward(rewards, w)
