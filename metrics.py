"""Diversity and mode metrics: what "the model kept its modes" means, as numbers.

The paper (Sec. 5, App. D) argues that TMPO keeps diversity where GRPO-style training collapses.
This file holds the numbers that claim is measured with, as pure functions (tensors in, floats out):

FLUX evaluation (Sec. 5.1; EQUATIONS.md, "Section 5 / App. D: metrics"):
  lgmd(latents)             Log Geometric Mean Distance between the N images of ONE prompt, in the
                            VAE latent space: (2 / (N (N-1))) sum_{i<j} log(||z_i - z_j|| / sqrt(d)).
                            > 0 healthy, < 0 collapse; average it over prompts yourself.
  cosine_diversity(feats)   GARDO's "Cos. Div.": mean over i != j of 1 - cos(f_i, f_j), f = DINOv2
                            ViT-L/14 CLS features of the images of one prompt.
  load_dinov2(path)         callable: images (N, 3, H, W) in [0, 1] -> (N, F) CLS features
                            (transformers' own DINOv2 model and image processor).
  check_images(images)      the input check of every image scorer (rewards.py uses it too).

2-D toy (used by toy/compare_modes.py; a "mode" is a Gaussian bump of the reward / data mixture):
  assign_modes, mode_masses, mode_entropy, within_mode_spread, mean_log_pairwise_distance,
  total_variation, tilted_mode_masses, tilted_ess, toy_mode_metrics.
  The Boltzmann target the method aims at (Sec. 4.1, q ~ p_base exp(beta R)) is estimated by
  self-normalised importance weighting of base samples, so "distance to the target" is a number
  (`tilted_tv`) instead of a picture.

Decisions (each also stated where it is made):
  * lgmd of a set with two identical latents is -inf: the exact value of the formula, and the
    honest answer for a fully collapsed set. No epsilon is added, because the number would then
    depend on an arbitrary constant. Continuous samplers from distinct noises never produce exact
    duplicates, so in practice it is finite; a -inf in a report means "duplicates", not a bug here.
  * mode_entropy over modes that hold no sample at all is 0 (nothing is covered, so nothing is
    covered evenly), and needs at least 2 modes (log 1 = 0 would divide by zero).
  * within_mode_spread averages over modes holding >= 2 samples (a single sample has no spread).
  * The 2-D `mean_log_pairwise_distance` IS `lgmd` on the points (d = 2), so it includes the
    -0.5 log 2 shift of the 1 / sqrt(d) normalisation; comparisons between methods are unaffected.

Everything is computed in float64. Only torch / numpy are imported at module level (the toy
imports this file); transformers is imported inside `load_dinov2`.

Run the tests:
    python -m pytest -x -q tests/test_metrics.py
Use (FLUX evaluation):
    from metrics import lgmd, cosine_diversity, load_dinov2
    dino = load_dinov2("/models/dinov2-large", device="cuda", dtype=torch.bfloat16)
    div = cosine_diversity(dino(images))        # images: (N, 3, H, W) in [0, 1], one prompt
    lg = lgmd(latents)                           # latents: (N, C, h, w) VAE latents, one prompt
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

# A high-reward mode counts as "covered" when it holds at least this fraction of the samples.
# 5% = 1/20: with the toy's few high-reward modes, a mode under 5% is visibly abandoned.
COVERED_MASS = 0.05

# DINOv2's image processor (preprocessor_config.json of facebook/dinov2-{small,base,large,giant}):
# BitImageProcessor, shortest_edge 256, bicubic (PIL resample 3), center crop 224x224,
# rescale 1/255, ImageNet mean / std.
DINO_PROCESSOR = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
DINO_DEFAULT_ID = "facebook/dinov2-large"


def need(ok, message: str, error=ValueError) -> None:
    """Raise `error(message)` unless `ok`: every check fails early, before any work, saying what to fix."""
    if not ok:
        raise error(message)


def check_images(images, what: str = "images") -> None:
    """Fail early, with what to fix, on images that are not a float (N, 3, H, W) tensor in [0, 1]
    (the layout of flux.decode; every reward in rewards.py and the DINOv2 features read it)."""
    is_4d = isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3
    need(is_4d, f"{what} must be a tensor (N, 3, H, W); got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    need(images.is_floating_point(), f"{what} must be floating point in [0, 1] (divide uint8 by 255); got {images.dtype}")
    need(torch.isfinite(images).all(), f"{what} contain NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    need(0.0 <= lo and hi <= 1.0, f"{what} must lie in [0, 1] (decode with (x / 2 + 0.5).clamp(0, 1)); "
                                  f"got min {lo:.4f}, max {hi:.4f}")


def _as_float64(x, name: str, min_ndim: int = 1) -> torch.Tensor:
    """Tensor / ndarray / list -> float64 tensor (same device for tensors); reject non-finite input."""
    t = (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach().to(torch.float64)
    need(t.ndim >= min_ndim, f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    need(torch.isfinite(t).all(), f"{name}: contains NaN or inf; fix the producer of these values, not the metric")
    return t


def _points(x, name: str) -> torch.Tensor:
    t = _as_float64(x, name, min_ndim=2)
    need(t.ndim == 2, f"{name}: expected (N, D) points, got shape {tuple(t.shape)}")
    need(t.shape[0] > 0, f"{name}: no points (N = 0)")
    return t


def _masses(p, name: str) -> torch.Tensor:
    """A probability vector over modes: (M,), non-negative, sums to 1."""
    t = _as_float64(p, name)
    need(t.ndim == 1, f"{name}: expected (M,) mode masses, got shape {tuple(t.shape)}")
    need(not (t < 0).any(), f"{name}: negative masses {t[t < 0].tolist()}")
    need(abs(t.sum().item() - 1.0) <= 1e-5, f"{name}: masses must sum to 1, got {t.sum().item()}")
    return t


# ---------------------------------------------------------------------------------------------
# FLUX evaluation metrics (Sec. 5.1)
# ---------------------------------------------------------------------------------------------


def lgmd(latents) -> float:
    """Log Geometric Mean Distance of ONE prompt's N samples (Sec. 5.1).

    LGMD = (2 / (N (N-1))) * sum_{i<j} log( ||z_i - z_j||_2 / sqrt(d) ),
    z_i = latents[i] flattened, d = its dimension. Dividing by sqrt(d) makes two independent
    N(0, I) latents score about log(sqrt(2)) = 0.35 whatever the resolution; > 0 healthy, < 0 the
    samples sit closer than unit-variance noise would (collapse).

    latents: (N, ...) with N >= 2. Returns -inf if two latents are identical (log 0; see the module
    docstring: no epsilon is added on purpose).
    """
    z = _as_float64(latents, "lgmd latents", min_ndim=2)
    n = z.shape[0]
    need(n >= 2, f"lgmd needs N >= 2 samples of one prompt, got N = {n}")
    z = z.reshape(n, -1)  # (N, d)
    # Sum of log distances over i < j, by blocks of rows so that N = 10^4 toy points do not
    # allocate an N x N matrix at once. cdist without the matmul trick: exact zeros for duplicates
    # and no cancellation error for close points.
    block, total = max(1, (1 << 22) // n), 0.0
    for a in range(0, n - 1, block):
        dist = torch.cdist(z[a:a + block], z[a + 1:], compute_mode="donot_use_mm_for_euclid_dist")  # (b, N - a - 1)
        pair = dist[torch.ones_like(dist, dtype=torch.bool).triu()]  # row r is i = a + r, column c is j = a + 1 + c: j > i
        if (pair == 0).any():
            return float("-inf")
        total += torch.log(pair).sum().item()
    return total / (n * (n - 1) / 2) - 0.5 * math.log(z.shape[1])  # mean log ||z_i - z_j|| - log sqrt(d)


def cosine_diversity(features) -> float:
    """GARDO's Cos. Div.: mean over ordered pairs i != j of 1 - cos(f_i, f_j).

    features: (N, F), N >= 2, no zero vector (its cosine is undefined). Identical features -> 0,
    mutually orthogonal -> 1, range [0, 2].
    """
    f = _points(features, "cosine_diversity features")
    n, norms = f.shape[0], f.norm(dim=1)  # norms: (N,)
    need(n >= 2, f"cosine_diversity needs N >= 2 feature vectors, got N = {n}")
    need(not (norms == 0).any(), "cosine_diversity: a feature vector is all zeros, its cosine is undefined")
    u = f / norms[:, None]  # (N, F) unit vectors
    cos = u @ u.T  # (N, N)
    return (1.0 - cos[~torch.eye(n, dtype=torch.bool, device=f.device)]).mean().item()  # off the diagonal: i != j


def load_dinov2(path_or_id: str = DINO_DEFAULT_ID, device="cpu", dtype=torch.float32, batch_size: int = 32):
    """Load a DINOv2 backbone; returns `features(images) -> (N, F)` CLS features (float32).

    path_or_id: a local folder saved by `save_pretrained` / `hf download` (config.json + weights),
      or a hub id (needs network). The paper's Cos. Div. uses ViT-L/14 = facebook/dinov2-large.
    The feature is the CLS token of `Dinov2Model`'s last_hidden_state, which Dinov2Model has
    already passed through its final layernorm (`sequence_output = self.layernorm(...)`); its
    pooler_output is that same token, so either gives the same vector (the tests check both).
    images: (N, 3, H, W) float in [0, 1], any size. Preprocessing is transformers' own DINOv2
    processor (BitImageProcessor with DINO_PROCESSOR, PIL backend: no torchvision): the images are
    quantised to uint8, as every reward sees them, then the shorter side resized to 256 (bicubic),
    center-cropped to 224 x 224 and normalised with ImageNet's mean / std. A folder that ships a
    different preprocessing is refused: it would not be the DINOv2 the metric means.
    batch_size: images per forward pass.
    """
    from pathlib import Path

    from transformers import Dinov2Model  # lazy: the toy imports this module without transformers
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    how_to_get = (
        f"download it on a machine with internet, e.g. `hf download {DINO_DEFAULT_ID} --local-dir "
        f"/models/dinov2-large` (older huggingface_hub: `huggingface-cli download ...`), copy the folder "
        "here and pass its path"
    )
    need(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    folder = os.path.expanduser(path_or_id)
    if os.path.isabs(path_or_id) or path_or_id.startswith((".", "~")) or os.path.exists(path_or_id):  # local
        need(os.path.isdir(folder), f"DINOv2 folder {folder!r} does not exist; {how_to_get}", FileNotFoundError)
        need(os.path.isfile(os.path.join(folder, "config.json")),
             f"DINOv2 folder {folder!r} has no config.json (not a model folder); {how_to_get}", FileNotFoundError)
        cfg_path = Path(folder, "preprocessor_config.json")  # absent in a weights-only folder: fine
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        for key, want in DINO_PROCESSOR.items():
            need(cfg.get(key, want) == want, f"{cfg_path}: {key} = {cfg.get(key)}, but DINOv2's processor (which this "
                                             f"metric uses) has {want}; point load_dinov2 at an unmodified facebook/dinov2-* folder")
    try:
        model = Dinov2Model.from_pretrained(path_or_id)
    except OSError as err:
        raise OSError(f"could not load DINOv2 from {path_or_id!r} ({err}); {how_to_get}") from err
    need(model.config.model_type == "dinov2", f"{path_or_id!r} holds a {model.config.model_type!r} model, expected 'dinov2'")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    processor = BitImageProcessorPil(**DINO_PROCESSOR)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        check_images(images, "DINOv2 input images")
        u8 = (images.detach().float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
        pixels = processor(images=list(u8), return_tensors="pt").pixel_values  # (N, 3, 224, 224) float32
        out = []
        for chunk in pixels.split(batch_size):
            hidden = model(pixel_values=chunk.to(device=device, dtype=dtype)).last_hidden_state  # (n, 1+P, F)
            out.append(hidden[:, 0].float())  # CLS token, already layer-normed
        return torch.cat(out)  # (N, F)

    features.model, features.processor = model, processor  # exposed for inspection and the tests
    return features


# ---------------------------------------------------------------------------------------------
# 2-D toy mode metrics
# ---------------------------------------------------------------------------------------------


def assign_modes(x, centers) -> torch.Tensor:
    """Index of the nearest center for each point: x (N, 2), centers (M, 2) -> (N,) long."""
    x, c = _points(x, "x"), _points(centers, "centers")
    need(x.shape[1] == c.shape[1], f"x has dimension {x.shape[1]} but centers have {c.shape[1]}")
    return torch.cdist(x, c.to(x.device), compute_mode="donot_use_mm_for_euclid_dist").argmin(dim=1)  # (N,)


def mode_masses(x, centers) -> torch.Tensor:
    """Fraction of the samples nearest to each center: (M,) float64, sums to 1."""
    num_modes = _points(centers, "centers").shape[0]
    idx = assign_modes(x, centers)  # (N,)
    counts = torch.bincount(idx, minlength=num_modes).to(torch.float64)  # (M,)
    return counts / idx.numel()


def _mode_index(modes, num_modes: int) -> torch.Tensor:
    idx = modes.detach().cpu() if isinstance(modes, torch.Tensor) else torch.as_tensor(np.asarray(modes))
    need(not idx.is_floating_point(), f"modes must be integer indices, got dtype {idx.dtype}")
    idx = idx.to(torch.long).reshape(-1)
    need(idx.numel() > 0, "modes is empty")
    need(0 <= idx.min() and idx.max() < num_modes, f"modes {idx.tolist()} out of range for {num_modes} modes")
    need(idx.unique().numel() == idx.numel(), f"modes {idx.tolist()} contains duplicates")
    return idx


def mode_entropy(masses, modes) -> float:
    """Normalised entropy of the masses restricted to `modes`, in [0, 1].

    p_m = masses[m] / sum_{m' in modes} masses[m'] for m in modes;  H = -sum p log p / log |modes|.
    1 = the samples in these modes are spread evenly over them, 0 = all in one of them.
    If no sample lands in any of `modes`, returns 0 (none covered, so none covered evenly).
    Needs |modes| >= 2 (for one mode the normalisation log 1 = 0 is undefined).
    """
    m = _masses(masses, "masses")
    idx = _mode_index(modes, m.shape[0]).to(m.device)
    need(idx.numel() >= 2, f"mode_entropy needs at least 2 modes, got {idx.tolist()}")
    sub = m[idx]  # (|modes|,)
    if sub.sum() == 0:
        return 0.0
    p = sub / sub.sum()
    h = -torch.xlogy(p, p).sum()  # 0 log 0 = 0
    return (h / math.log(idx.numel())).item()


def within_mode_spread(x, centers) -> float:
    """Within-mode diversity: mean over modes holding >= 2 samples of the RMS distance of that
    mode's samples to their own mean (not to the center).

    Distance to the own mean, so a mode reduced to a tight cluster scores ~0 even if the cluster
    sits off the center; unweighted mean over modes, so one crowded mode does not hide collapsed
    ones. A mode with a single sample has no measurable spread and is left out.
    """
    xs = _points(x, "x")
    idx = assign_modes(xs, centers)  # (N,)
    groups = [xs[idx == m] for m in idx.unique().tolist()]  # (n_m, D) each
    # RMS distance of a mode's samples to their own mean; dev = pts - mean broadcasts the (1, D) mean over n_m rows
    spreads = [(pts - pts.mean(dim=0, keepdim=True)).pow(2).sum(dim=1).mean().sqrt().item() for pts in groups
               if pts.shape[0] >= 2]
    need(spreads, "within_mode_spread: no mode holds 2 or more samples; use more samples")
    return float(np.mean(spreads))


def mean_log_pairwise_distance(x) -> float:
    """The LGMD analogue for toy points: exactly `lgmd(x)` with d = 2, i.e. mean over i < j of
    log ||x_i - x_j|| minus 0.5 log 2 (the paper's 1 / sqrt(d)). -inf if two points coincide."""
    return lgmd(_points(x, "x"))


def total_variation(p, q) -> float:
    """TV distance between two mode-mass vectors: 0.5 * sum_m |p_m - q_m|, in [0, 1]."""
    p, q = _masses(p, "p"), _masses(q, "q")
    need(p.shape == q.shape, f"p has {p.shape[0]} modes, q has {q.shape[0]}")
    return 0.5 * (p - q.to(p.device)).abs().sum().item()


def tilt_weights(base_rewards, beta: float) -> torch.Tensor:
    """(N,) float64 self-normalised weights of base samples under q ~ p_base exp(beta R)."""
    r = _as_float64(base_rewards, "base_rewards")
    need(r.ndim == 1 and r.numel() > 0, f"base_rewards: expected (N,) with N >= 1, got shape {tuple(r.shape)}")
    need(math.isfinite(beta), f"beta must be finite, got {beta}")
    # Self-normalised importance weights of q(x) ~ p_base(x) exp(beta R(x)) w.r.t. p_base:
    # w_i = exp(beta R_i) / sum_j exp(beta R_j), the Boltzmann target of Sec. 4.1 on base samples.
    return torch.softmax(beta * r, dim=0)  # (N,)


def tilted_mode_masses(base_x, base_rewards, beta: float, centers) -> torch.Tensor:
    """Mode masses of the reward-tilted target q(x) ~ p_base(x) exp(beta R(x)), (M,) float64.

    Estimated from base-model samples by self-normalised importance weighting:
    q(mode m) ~= sum_{i: x_i nearest to m} softmax(beta R)_i. Check `tilted_ess` before trusting
    it: with a large beta a handful of samples carry all the weight.
    """
    xs = _points(base_x, "base_x")
    w = tilt_weights(base_rewards, beta)  # (N,)
    need(w.shape[0] == xs.shape[0], f"base_x has {xs.shape[0]} samples but base_rewards has {w.shape[0]}")
    idx = assign_modes(xs, centers)  # (N,)
    return torch.zeros(_points(centers, "centers").shape[0], dtype=torch.float64, device=w.device).index_add_(
        0, idx.to(w.device), w)  # (M,): the weights of the samples nearest to each mode


def tilted_ess(base_rewards, beta: float) -> float:
    """Kish effective sample size of the tilt weights: 1 / sum_i w_i^2, in [1, N].
    N when the rewards are all equal (or beta = 0); 1 when one sample takes all the weight."""
    w = tilt_weights(base_rewards, beta)
    return (1.0 / w.pow(2).sum()).item()


def toy_mode_metrics(x, rewards, centers, high_modes, target_masses) -> dict:
    """All toy numbers for one set of samples x (N, 2) with rewards (N,).

    Keys:
      mean_reward         mean of `rewards`
      high_mode_mass      fraction of samples nearest to a high-reward mode
      modes_covered       number of high-reward modes holding >= COVERED_MASS (5%) of the samples
      mode_entropy        normalised entropy of the masses over the high-reward modes (1 = even)
      within_mode_spread  mean RMS distance of a mode's samples to their own mean (see function)
      lgmd                mean_log_pairwise_distance(x), the 2-D LGMD analogue
      tilted_tv           TV between these mode masses and `target_masses` (e.g. tilted_mode_masses)
    """
    xs = _points(x, "x")
    r = _as_float64(rewards, "rewards")
    need(r.ndim == 1 and r.shape[0] == xs.shape[0], f"rewards must be (N,) = ({xs.shape[0]},), got shape {tuple(r.shape)}")
    masses = mode_masses(xs, centers)  # (M,)
    high = _mode_index(high_modes, masses.shape[0])
    return {
        "mean_reward": r.mean().item(),
        "high_mode_mass": masses[high].sum().item(),
        "modes_covered": int((masses[high] >= COVERED_MASS).sum().item()),
        "mode_entropy": mode_entropy(masses, high),
        "within_mode_spread": within_mode_spread(xs, centers),
        "lgmd": mean_log_pairwise_distance(xs),
        "tilted_tv": total_variation(masses, target_masses),
    }
