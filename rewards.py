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
| `hps`         | cos(image, text), HPS-v2.1 (open_clip ViT-H-14)              | ~0.30-0.37     |
| `imagereward` | (BLIP + MLP head - 0.16717) / 1.03334, ImageReward-v1.0      | ~1.1-1.6       |
| `geneval`     | GenEval server: strict 0/1 (training) or fraction of criteria | 0-1            |
| `ocr`         | 1 - Levenshtein / max(len) vs the prompt's quoted text       | 0-1            |

What each loads (`path`; nothing is downloaded by the tests):
    pickscore     a transformers CLIPModel folder or hub id (default yuvalkirstain/PickScore_v1);
                  its processor from the folder, else laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    hps           the folder tools/convert_hps.py writes from HPS_v2.1_compressed.pt (a CLIPModel)
    imagereward   the folder tools/convert_imagereward.py writes from ImageReward.pt (BLIP modules + head)
    geneval       the URL of Flow-GRPO's GenEval reward server (default http://127.0.0.1:18085)
    ocr           nothing: pip install rapidocr-onnxruntime (its models ship in the wheel)
HPS-v2.1 and ImageReward ship as checkpoints of other code bases (open_clip, BLIP) that need
torchvision; the two scripts in tools/ convert them once into transformers folders (README, "Reward
models"), and tests/test_rewards.py checks the converted models against both forwards re-derived
in plain torch.

Multi-reward training (App. D.2): each reward is z-scored within its K-trajectory group and the
z-scores are averaged with the weights; see aggregate_rewards for what the advantage must do with it.

    python -c "import rewards; print(rewards.REWARDS)"
    python -c "import rewards, torch; f = rewards.load_reward('pickscore', device='cuda'); \
print(f(torch.rand(2, 3, 512, 512, device='cuda'), ['a cat', 'a dog']))"
    python -m pytest -q tests/test_rewards.py
"""

from __future__ import annotations

import io
import json
import math
import numbers
import os
import pickle
import time
from typing import Callable, Sequence

import torch

from metrics import check_images, need
from tmpo import group_zscore

REWARDS = ("pickscore", "hps", "imagereward", "geneval", "ocr")

DEFAULT_GENEVAL_URL = "http://127.0.0.1:18085"  # port of Flow-GRPO's GenEval reward server
PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore_v1's processor (as PickScore's own example)
# reward -> (the script that writes its folder, the official checkpoint it reads)
CONVERTERS = {"hps": ("tools/convert_hps.py", "HPS_v2.1_compressed.pt"),
              "imagereward": ("tools/convert_imagereward.py", "ImageReward.pt")}

# OpenAI CLIP's normalisation, used by open_clip (HPS) and by BLIP (ImageReward) alike.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ZSCORE_EPS = 1e-4  # eps of the within-group z-score (App. D.2), as Flow-GRPO's advantage

# ----------------------------------------------------------------------------------------------
# Shared checks and image handling
# ----------------------------------------------------------------------------------------------


def check_inputs(images: torch.Tensor, prompts: Sequence[str], metadata=None) -> None:
    """Fail early, with what to fix, on anything a reward cannot score (images: metrics.check_images)."""
    check_images(images)
    need(not isinstance(prompts, str) and len(prompts) == images.shape[0],
         f"need one prompt per image: {images.shape[0]} images, prompts={prompts!r:.200}")
    need(all(isinstance(p, str) for p in prompts), "prompts must be strings")
    need(metadata is None or (len(metadata) == len(prompts) and all(isinstance(m, dict) for m in metadata)),
         "metadata must be None or a list of one dict per image")


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
    open_clip (HPS) and BLIP (ImageReward); transformers' CLIPImageProcessor floors the crop offset
    where torchvision rounds it, so it is not used for these two. Returns (N, 3, size, size) float32."""
    import numpy as np
    from PIL import Image

    out = []
    for im in pil_images:
        w, h = im.size
        # Resize(int): the shorter side becomes `size`, the longer keeps the aspect ratio (truncated).
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im if (new_w, new_h) == (w, h) else im.resize((new_w, new_h), Image.BICUBIC)
        # CenterCrop: torchvision rounds the offsets to the nearest integer.
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0))  # (size, size, 3)
    x = torch.stack(out).permute(0, 3, 1, 2)  # (N, size, size, 3) -> (N, 3, size, size)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)  # (3,) broadcast per channel


def _chunks(n: int, batch_size: int):
    need(batch_size >= 1, f"batch_size must be >= 1; got {batch_size}")
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # No eps: a zero embedding gives NaN, which check_finite reports instead of hiding.
    a, b = a.float(), b.float()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # (n,)


def _from_pretrained(cls, path: str, what: str, how: str, **kw):
    """cls.from_pretrained(path), re-raised with what was being loaded and how to get it."""
    try:
        return cls.from_pretrained(path, **kw)
    except Exception as e:  # missing folder, no network for a hub id, missing or corrupt file...
        got = f"{type(e).__name__}: {str(e)[:300]}"
        if not os.path.exists(path):
            got = f"{path} does not exist as a folder; as a hub id: {got}"
        raise FileNotFoundError(f"could not load {what} from '{path}' ({got}). {how}") from e


def converted_folder(path, name: str) -> tuple[str, dict]:
    """`path` if it is the folder that tools/convert_{name}.py wrote (its reward.json says so), with
    that reward.json; otherwise an error that says which script to run on which checkpoint."""
    script, ckpt = CONVERTERS[name]
    path = None if path is None else os.fspath(path)
    given = path if path is not None and os.path.isfile(path) else ckpt  # a file is most likely the checkpoint itself
    how = f"Convert the official {ckpt} once: python {script} --checkpoint {given} --out DIR, and pass DIR"
    need(path is not None, f"the {name} reward loads a converted transformers folder. {how}", FileNotFoundError)
    state = "is a file" if os.path.isfile(path) else "has no reward.json" if os.path.isdir(path) else "does not exist"
    need(os.path.isfile(os.path.join(path, "reward.json")), f"{name} path {path} {state}: not a folder written by "
                                                            f"{script}. {how}", FileNotFoundError)
    with open(os.path.join(path, "reward.json")) as f:
        info = json.load(f)
    need(info.get("reward") == name, f"{path} is a converted '{info.get('reward')}' folder, not {name}")
    return path, info


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
            text = self.processor.tokenizer(list(prompts[sl]), padding=True, truncation=True, max_length=77,
                                            return_tensors="pt").to(device)
            img = m.visual_projection(m.vision_model(pixel_values=pixels.to(device, dtype)).pooler_output)
            txt = m.text_projection(m.text_model(**text).pooler_output)
            out.append(m.logit_scale.float().exp() * _cosine(img, txt))
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_pickscore(path=None, device="cpu", dtype=torch.float32, processor_path=None, batch_size: int = 32):
    """PickScore from a transformers CLIPModel folder or hub id (default yuvalkirstain/PickScore_v1).

    The processor comes from `processor_path`; if not given, from the model folder when it holds
    processor files, else from laion/CLIP-ViT-H-14-laion2B-s32B-b79K (as PickScore's own example)."""
    from transformers import CLIPModel, CLIPProcessor

    path = os.fspath(path or PICKSCORE_ID)
    if processor_path is None:
        # preprocessor_config.json (transformers 4) or processor_config.json (transformers 5) holds the image settings.
        has_processor = any(os.path.isfile(os.path.join(path, n)) for n in ("preprocessor_config.json", "processor_config.json"))
        processor_path = path if has_processor else LAION_CLIP_H
    model = _from_pretrained(CLIPModel, path, "PickScore", f"Get it with: hf download {PICKSCORE_ID} "
                             "--local-dir DIR, and pass DIR", dtype=dtype)
    processor = _from_pretrained(CLIPProcessor, processor_path, "the PickScore processor", "Get it with: "
                                 f"hf download {LAION_CLIP_H}, or pass processor_path=<folder>")
    return PickScore(model.to(device), processor, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# HPS-v2.1: a CLIPModel converted from open_clip by tools/convert_hps.py
# ----------------------------------------------------------------------------------------------


class HPSv21:
    """HPS-v2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

    score = cos(image, text) (hpsv2's score is image_features @ text_features of normalised
    features, without the logit scale; paper: ~0.30-0.37). Images go through open_clip's own
    evaluation transform (clip_pixels), text through open_clip's tokenisation (tokenize)."""

    name = "hps"

    def __init__(self, model, tokenizer, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model.eval().requires_grad_(False), tokenizer, batch_size
        self.image_size = model.config.vision_config.image_size
        self.context_length = model.config.text_config.max_position_embeddings

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
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        out = []
        for sl in _chunks(len(prompts), self.batch_size):
            img, txt = self.embed(clip_pixels(to_pil(images[sl]), self.image_size), self.tokenize(prompts[sl]))
            out.append(_cosine(img, txt))
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_hps(path=None, device="cpu", dtype=torch.float32, batch_size: int = 32) -> HPSv21:
    """HPS-v2.1 from the folder tools/convert_hps.py wrote (CLIPModel + CLIP tokenizer + reward.json)."""
    from transformers import AutoTokenizer, CLIPModel

    folder, _ = converted_folder(path, "hps")
    again = "Convert it again with tools/convert_hps.py."
    model = _from_pretrained(CLIPModel, folder, "HPS-v2.1", again, dtype=dtype)
    tokenizer = _from_pretrained(AutoTokenizer, folder, "the HPS tokenizer", again)
    return HPSv21(model.to(device), tokenizer, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------
# ImageReward: BLIP modules + MLP head converted by tools/convert_imagereward.py
# ----------------------------------------------------------------------------------------------


class ImageReward:
    """ImageReward-v1.0 (Xu et al. 2023): BLIP ViT-L image encoder, BERT text encoder that
    cross-attends to the image patches, and an MLP on the [CLS] state; output standardised as
    (raw - mean) / std with ImageReward's 0.16717362830052426 / 1.0333394966054072 (paper: ~1.1-1.6).

    Text is tokenized as ImageReward's score() does: padding "max_length", truncation, max_length
    35, starting with [CLS]. (BLIP's retrieval/ITM code swaps the first token for [ENC];
    ImageReward's inference and training code do not, so neither does this.)"""

    name = "imagereward"

    def __init__(self, vision, text, head, tokenizer, mean: float, std: float, max_length: int, batch_size: int = 32):
        self.vision, self.text = vision.eval().requires_grad_(False), text.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.tokenizer, self.mean, self.std, self.max_length = tokenizer, mean, std, max_length
        self.image_size, self.batch_size = vision.config.image_size, batch_size

    def tokenize(self, prompts: Sequence[str]) -> dict:
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def raw_score(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The MLP output before standardisation, (n,)."""
        device, dtype = self.vision.post_layernorm.weight.device, self.vision.post_layernorm.weight.dtype
        image_embeds = self.vision(pixel_values=pixels.to(device, dtype)).last_hidden_state  # (n, 1 + grid^2, Wv)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        # is_decoder=False: bidirectional self-attention, then cross-attention to the patches
        # (med.py's BertModel in mode "multimodal").
        hidden = self.text(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                           is_decoder=False).last_hidden_state  # (n, 35, Wt)
        return self.head(hidden[:, 0].float()).squeeze(-1)  # [CLS] state -> (n,), in float32 as ImageReward

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        out = []
        for sl in _chunks(len(prompts), self.batch_size):
            tok, pixels = self.tokenize(prompts[sl]), clip_pixels(to_pil(images[sl]), self.image_size)
            raw = self.raw_score(pixels, tok["input_ids"], tok["attention_mask"])
            out.append((raw - self.mean) / self.std)
        return check_finite(self.name, torch.cat(out).to(images.device), prompts)


def load_imagereward(path=None, device="cpu", dtype=torch.float32, batch_size: int = 32) -> ImageReward:
    """ImageReward from the folder tools/convert_imagereward.py wrote: vision/ (BlipVisionModel),
    text/ (BlipTextModel, no pooler), head.safetensors (the MLP's Linear chain), the BERT tokenizer
    with [DEC]/[ENC], and reward.json (mean, std, max_length)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

    folder, info = converted_folder(path, "imagereward")
    again = "Convert it again with tools/convert_imagereward.py."
    vision = _from_pretrained(BlipVisionModel, os.path.join(folder, "vision"), "the ImageReward image encoder", again,
                              dtype=dtype)
    text = _from_pretrained(BlipTextModel, os.path.join(folder, "text"), "the ImageReward text encoder", again,
                            dtype=dtype, add_pooling_layer=False)
    tokenizer = _from_pretrained(AutoTokenizer, folder, "the ImageReward tokenizer", again)
    sd = load_file(os.path.join(folder, "head.safetensors"))  # "0.weight", "0.bias", "1.weight", ...
    head = torch.nn.Sequential(*[torch.nn.Linear(sd[f"{i}.weight"].shape[1], sd[f"{i}.weight"].shape[0])
                                 for i in range(len(sd) // 2)])
    head.load_state_dict(sd)  # strict: every Linear filled, nothing left over; float32, as ImageReward's .float()
    return ImageReward(vision.to(device), text.to(device), head.to(device), tokenizer, info["mean"], info["std"],
                       info["max_length"], batch_size)


# ----------------------------------------------------------------------------------------------
# GenEval: client of Flow-GRPO's GenEval reward server
# ----------------------------------------------------------------------------------------------

GENEVAL_TIMEOUT = 120.0  # s per request: the reward server's own gunicorn worker timeout (reward-server)
GENEVAL_RETRIES = 3  # retries after the first attempt (connection errors, timeouts, HTTP 5xx)
GENEVAL_DEADLINE = 600.0  # s for one whole call (all its batches and retries)
CONNECT_TIMEOUT = 10.0  # s at most for the reachability check: a live server answers a GET within milliseconds
SERVER_HINT = ("Start Flow-GRPO's GenEval reward server (reward-server/app_geneval.py) there, "
               "or pass its address (--geneval-url).")


class RewardServerError(RuntimeError):
    """The reward server is unreachable, kept failing, or replied with something that is not a reward."""


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
    "scores"; the TMPO setup, App. D, trains on the strict reward.) Only that one field is read:
    the others may hold anything.

    Failure bounds: each request waits at most `timeout` s for the server (connect, and between
    bytes of the reply); connection errors, timeouts and HTTP 5xx are retried `retries` times with
    exponential backoff (backoff, 2 backoff, 4 backoff, ...); one call (all its batches) gives up
    after `deadline` s. Construction checks that the server answers at all (an HTTP GET within
    `timeout`, at most CONNECT_TIMEOUT), so train.py fails before FLUX loads, also on a server that
    accepts connections and never replies.
    Every failure is a RewardServerError naming the URL and the last thing that came back.

    SECURITY: the reply is unpickled, and unpickling runs whatever code the sender chose. Only
    point this at a server you run yourself, on a network you trust (default 127.0.0.1:18085)."""

    name = "geneval"

    def __init__(self, url: str = DEFAULT_GENEVAL_URL, strict: bool = True, timeout: float = GENEVAL_TIMEOUT,
                 retries: int = GENEVAL_RETRIES, deadline: float = GENEVAL_DEADLINE, backoff: float = 1.0,
                 batch_size: int = 64):
        for arg, v in (("timeout", timeout), ("deadline", deadline), ("backoff", backoff)):
            need(isinstance(v, numbers.Real) and math.isfinite(v) and (v > 0 or (v == 0 and arg == "backoff")),
                 f"GenEval {arg} must be a finite number of seconds (> 0; backoff >= 0); got {v!r}")
        need(isinstance(retries, int) and retries >= 0, f"GenEval retries must be an integer >= 0; got {retries!r}")
        self.url, self.strict, self.timeout, self.retries = url, strict, float(timeout), retries
        self.deadline, self.backoff, self.batch_size = float(deadline), float(backoff), batch_size
        self.field = "strict_rewards" if strict else "scores"
        self.check_reachable()

    def check_reachable(self) -> None:
        """Ask the server for anything (an HTTP GET) within `timeout`: fails fast, naming the URL.

        Any HTTP answer counts (the scorer only serves POST, so 405/501 is the usual one); what fails
        is no answer: nothing listening, or a server that accepts the connection and never replies.
        """
        import requests
        from urllib.parse import urlsplit

        try:
            u = urlsplit(self.url)
            ok = u.scheme in ("http", "https") and bool(u.hostname) and u.port is not None
        except ValueError:  # a port that is not a number
            ok = False
        need(ok, f"GenEval server URL must look like http://HOST:PORT; got {self.url!r}")
        try:
            requests.get(self.url, timeout=min(self.timeout, CONNECT_TIMEOUT)).close()
        except requests.RequestException as e:
            raise RewardServerError(f"GenEval server at {self.url} is not reachable or does not answer within "
                                    f"{min(self.timeout, CONNECT_TIMEOUT):g} s ({type(e).__name__}: {str(e)[:200]}). "
                                    f"{SERVER_HINT}") from e

    def _post(self, body: bytes, give_up_at: float) -> bytes:
        import requests

        last, tries = "no attempt (deadline already passed)", 0
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** (attempt - 1) if attempt else 0.0
            if time.monotonic() + wait >= give_up_at:
                break
            time.sleep(wait)
            tries += 1
            try:
                r = requests.post(self.url, data=body, timeout=min(self.timeout, give_up_at - time.monotonic()))
            except requests.RequestException as e:  # refused, reset, timed out, broken reply...
                last = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            if r.status_code == 200:
                return r.content
            lines = r.content.decode("utf-8", "replace").strip().splitlines()
            last = f"HTTP {r.status_code}: {lines[-1][:300] if lines else '(empty body)'}"
            if r.status_code < 500:  # a client error: retrying the same request cannot help
                break
        raise RewardServerError(f"GenEval server at {self.url} failed after {tries} attempt(s) (timeout {self.timeout:g} s "
                                f"per request, {self.retries} retries, deadline {self.deadline:g} s per call); last error: "
                                f"{last}. {SERVER_HINT}")

    def _scores(self, content: bytes, n: int) -> list:
        """The `field` list of a 200 reply, checked: n real numbers, else an error showing what came back."""
        try:
            reply = pickle.loads(content)  # trusted server only: see the class docstring
        except Exception as e:  # HTML from a proxy, another service on the port, a truncated body...
            raise RewardServerError(f"GenEval server at {self.url} replied 200 with something that is not a pickled "
                                    f"reply ({type(e).__name__}); it began {content[:200]!r}. Is {self.url} the GenEval "
                                    "reward server?") from None
        values = reply.get(self.field) if isinstance(reply, dict) else None
        need(isinstance(values, (list, tuple)) and len(values) == n, f"GenEval server at {self.url} sent no list of {n} "
             f"'{self.field}' for {n} images: {str(reply)[:300]}", RewardServerError)
        bad = [(i, v) for i, v in enumerate(values) if not isinstance(v, numbers.Real)]
        if bad:
            raise RewardServerError(f"GenEval server at {self.url} sent '{self.field}'[{bad[0][0]}] = {bad[0][1]!r}, not a "
                                    f"number ({len(bad)} of {n} entries): {str(reply)[:300]}")
        return [float(v) for v in values]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata=None) -> torch.Tensor:
        check_inputs(images, prompts, metadata)
        need(metadata is not None and all(k in m for m in metadata for k in ("tag", "prompt", "include")),
             "the geneval reward needs each prompt's GenEval metadata (a dict with 'tag', 'prompt', 'include', as in "
             "GenEval's evaluation_metadata.jsonl)")
        give_up_at = time.monotonic() + self.deadline
        scores = []
        for sl in _chunks(len(prompts), self.batch_size):
            jpegs = []
            for im in to_pil(images[sl]):
                buf = io.BytesIO()
                im.save(buf, format="JPEG")  # PIL's default quality 75, as Flow-GRPO's client
                jpegs.append(buf.getvalue())
            body = pickle.dumps({"images": jpegs, "meta_datas": list(metadata[sl]), "only_strict": self.strict})
            scores += self._scores(self._post(body, give_up_at), len(jpegs))
        return check_finite(self.name, torch.tensor(scores, dtype=torch.float32).to(images.device), prompts)


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
    need(len(parts) >= 3 and parts[1].strip(), "the ocr reward needs the target text in double quotes in the prompt, "
                                                f"e.g. 'a sign that says \"hello\"'; got {prompt!r}")
    return parts[1]


def ocr_similarity(recognized: str, target: str) -> float:
    """1 - Levenshtein(recognized, target) / max(len): 1 for an exact match, 0 for nothing in common.

    Both strings are lower-cased and stripped of whitespace first, as Flow-GRPO's OCR reward does
    (the recognizer splits lines and words arbitrarily). Unlike Flow-GRPO, extra recognised
    characters are not forgiven (it scores 1 whenever the target is a substring): normalising by
    the longer string is the standard NED and penalises spurious text."""
    a, b = "".join(recognized.lower().split()), "".join(target.lower().split())
    need(b, "empty OCR target text")
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


def load_reward(name: str, path=None, device="cpu", dtype=torch.float32, **kw) -> Callable[..., torch.Tensor]:
    """The reward `name` as a callable fn(images, prompts, metadata=None) -> (N,) float32.

    `path`: see the module docstring (geneval: the server URL; ocr: none). Extra keywords go to
    the reward: batch_size for every model-based reward and geneval; pickscore processor_path;
    geneval strict, timeout, retries, deadline, backoff (GenEvalClient)."""
    need(name in REWARDS, f"unknown reward '{name}'; known rewards: {', '.join(REWARDS)}")
    if name == "geneval":
        return GenEvalClient(url=path or DEFAULT_GENEVAL_URL, **kw)
    if name == "ocr":
        need(path is None, "the ocr reward takes no path (its models ship with rapidocr-onnxruntime)")
        return OCRReward(**kw)
    loader = {"pickscore": load_pickscore, "hps": load_hps, "imagereward": load_imagereward}[name]
    return loader(path, device=device, dtype=dtype, **kw)


def _parse_list(value) -> list:
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)


def _weights(names: Sequence[str], weights) -> dict:
    """{name: w_m}: one finite weight > 0 per reward (default all equal)."""
    if isinstance(weights, dict):
        need(set(weights) == set(names), f"weights are for {sorted(weights)} but the rewards are {list(names)}")
    w = [1.0] * len(names) if weights is None else [weights[n] for n in names] if isinstance(weights, dict) \
        else _parse_list(weights)
    need(len(w) == len(names), f"{len(w)} weight(s) {w} for {len(names)} reward(s) {list(names)}: give one weight per reward")
    try:
        w = [float(x) for x in w]
    except (TypeError, ValueError):
        raise ValueError(f"reward weights must be numbers, one per reward {list(names)}; got {weights!r}") from None
    need(all(math.isfinite(x) and x > 0 for x in w),
         f"reward weights must be finite and > 0 (leave a reward out rather than weight it 0); got {w}")
    need(len(w) != 1 or w[0] == 1.0, f"a single reward ({names[0]}) passes through unchanged; its weight "
                                     f"{w[0] if w else ''} would have no effect: use 1")
    return dict(zip(names, w))


def aggregate_rewards(scores: dict, weights=None) -> torch.Tensor:
    """Combine rewards {name: (G, K)} into R (G, K), the last dimension being the group of K
    trajectories of one prompt (App. D.2), as the authors' release does ("advantage_aggr"):

        R = sum_m w_m * (r_m - mean_K r_m) / (std_K r_m + eps),   w normalised to sum_m w_m = 1

    (population std, eps = 1e-4). Each reward is standardised within the group, so rewards on
    different scales (PickScore ~22, HPS ~0.3) weigh as the weights say.

    R is final: the advantage (beta R in Eq. 5, or GRPO's Eq. 28) reads it as is and must not
    z-score it again. That is what the release does (its softmax_tb reads the aggregate directly,
    with weights 0.333, 0.333, 0.334). Z-scoring R a second time rescales it by 1 / std_K(R):
    about sqrt(3) = 1.73 for three independent rewards, so beta would act ~1.7x stronger than in
    the release. Departure: the weights are normalised here (the release uses them as given; its
    configs' weights already sum to 1), so "1,1,1" means "equal weight", as the paper says, and
    the weights set only the mix, never beta's scale. (The release divides by max(std, 1e-4), this
    by std + 1e-4, as Flow-GRPO: a relative difference of 1e-4 / std, negligible unless a reward
    barely varies within the group.)

    A single reward is returned unchanged (its weight must be 1): standardising it within the
    group is the trainer's choice (train.py --reward-zscore, on as in the release, whose
    "advantage_aggr" with one reward is exactly that z-score). MultiReward.standardized tells
    the trainer which case it has."""
    names = list(scores)
    need(names, "no rewards to aggregate")
    w = _weights(names, weights)
    if len(names) == 1:
        return scores[names[0]]
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    need(len(set(shapes.values())) == 1, f"rewards must share the (G, K) shape: {shapes}")
    total = sum(w.values())
    return sum(w[n] / total * group_zscore(scores[n].float(), eps=ZSCORE_EPS, dim=-1) for n in names)  # App. D.2


class MultiReward:
    """Several rewards on the same images: returns the raw scores per reward and their aggregate.

    __call__(images, prompts, metadata=None, group_size=None) -> (raw {name: (N,)}, R (N,)).
    Images are group-major (as tree_sampler's Rollout.x0): rows g*K ... g*K + K - 1 are the K
    trajectories of prompt g, and `group_size` = K (needed for more than one reward).
    `standardized` is True when R is already the group-standardised aggregate (several rewards),
    which the advantage must read as is (see aggregate_rewards)."""

    def __init__(self, rewards: dict, weights=None):
        self.rewards = dict(rewards)
        self.weights = _weights(list(self.rewards), weights)

    @property
    def names(self) -> list:
        return list(self.rewards)

    @property
    def standardized(self) -> bool:
        return len(self.rewards) > 1

    def __call__(self, images, prompts, metadata=None, group_size: int | None = None):
        raw = {n: fn(images, prompts, metadata) for n, fn in self.rewards.items()}
        if len(raw) == 1:
            return raw, next(iter(raw.values()))
        need(group_size is not None and group_size >= 1 and len(prompts) % group_size == 0,
             f"pass group_size=K (trajectories per prompt) dividing the batch of {len(prompts)}: each reward is "
             f"z-scored within its group before the weighted sum (App. D.2); got {group_size}")
        for g in range(0, len(prompts), group_size):  # group-major: each block of K rows is one prompt's
            need(len(set(prompts[g:g + group_size])) == 1,
                 f"rows {g}..{g + group_size - 1} mix prompts: images must be group-major with group_size={group_size}")
        grouped = {n: r.reshape(-1, group_size) for n, r in raw.items()}  # (N,) -> (G, K)
        return raw, aggregate_rewards(grouped, self.weights).reshape(-1)  # (G, K) -> (N,)


def load_rewards(names, weights=None, paths=None, device="cpu", dtype=torch.float32, reward_kwargs=None) -> MultiReward:
    """MultiReward from "pickscore,hps,imagereward"-style names and "1,1,1"-style weights.

    `paths`: {name: path}, or a comma list aligned with names (empty entries = default);
    `reward_kwargs`: {name: {keyword: value}} passed to each loader, e.g.
    {"geneval": {"timeout": 60, "retries": 2}}. Everything is checked before any model loads."""
    names = _parse_list(names)
    need(names and "" not in names and len(set(names)) == len(names), f"reward names must be distinct and non-empty: {names}")
    unknown = [n for n in names if n not in REWARDS]
    need(not unknown, f"unknown reward(s) {unknown}; known rewards: {', '.join(REWARDS)}")
    w = _weights(names, weights)
    if paths is not None and not isinstance(paths, dict):
        p = _parse_list(paths)
        need(len(p) == len(names), f"{len(p)} path(s) for {len(names)} reward(s): give one per reward (empty = default)")
        paths = {n: (x or None) for n, x in zip(names, p)}
    paths = paths or {}
    need(not set(paths) - set(names), f"paths given for rewards not loaded: {sorted(set(paths) - set(names))}")
    reward_kwargs = reward_kwargs or {}  # keywords for a reward that is not loaded are not used
    rewards = {n: load_reward(n, paths.get(n), device=device, dtype=dtype, **reward_kwargs.get(n, {})) for n in names}
    return MultiReward(rewards, w)
