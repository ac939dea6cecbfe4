"""Tests for metrics.py: every metric re-derived by hand on small inputs, the reward-tilted mode
masses against closed forms, and the DINOv2 loader against transformers on a tiny random model.

    python -m pytest -x -q tests/test_metrics.py
"""

import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import metrics  # noqa: E402
from metrics import (  # noqa: E402
    assign_modes,
    cosine_diversity,
    lgmd,
    mean_log_pairwise_distance,
    mode_entropy,
    mode_masses,
    tilted_ess,
    tilted_mode_masses,
    total_variation,
    toy_mode_metrics,
    within_mode_spread,
)


# ----------------------------------------------------------------------------------------------
# LGMD
# ----------------------------------------------------------------------------------------------


def test_lgmd_two_latents_by_hand():
    z = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]], [[0.0, 0.0, 3.0], [1.0, -1.0, 1.0]]])  # (2, 2, 3)
    diff = [1 - 0, 2 - 0, 0 - 3, 0 - 1, 0 + 1, 1 - 1]
    expected = math.log(math.sqrt(sum(v * v for v in diff)) / math.sqrt(6))
    assert lgmd(z) == pytest.approx(expected, abs=1e-12)


def test_lgmd_three_point_345_triangle():
    # Pairwise distances 3, 4, 5; d = 2.
    pts = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    expected = (math.log(3) + math.log(4) + math.log(5)) / 3 - 0.5 * math.log(2)
    assert lgmd(torch.tensor(pts)) == pytest.approx(expected, abs=1e-12)
    assert mean_log_pairwise_distance(np.array(pts)) == pytest.approx(expected, abs=1e-12)


def test_lgmd_matches_double_loop_and_scales_by_log_c():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    flat = z.reshape(5, -1).double()
    logs = [math.log((flat[i] - flat[j]).norm().item() / math.sqrt(18)) for i, j in itertools.combinations(range(5), 2)]
    assert lgmd(z) == pytest.approx(sum(logs) / len(logs), abs=1e-12)
    # Translation invariant; scaling all latents by c adds log c.
    assert lgmd(z + 7.0) == pytest.approx(lgmd(z), abs=1e-9)
    assert lgmd(3.0 * z) == pytest.approx(lgmd(z) + math.log(3.0), abs=1e-9)


def test_lgmd_many_points_uses_blocks_and_matches_pdist():
    # N = 2100 > 2^22 / N rows per block, so the blocked sum runs over several blocks.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2100, 2, generator=g, dtype=torch.float64)
    ref = torch.log(F.pdist(x)).mean().item() - 0.5 * math.log(2)
    assert lgmd(x) == pytest.approx(ref, abs=1e-9)


def test_lgmd_of_independent_gaussian_latents_is_log_sqrt2():
    # ||z_i - z_j||^2 ~ 2d for independent N(0, I): the sqrt(d) normalisation maps this to log sqrt 2.
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 16, 32, 32, generator=g)
    assert lgmd(z) == pytest.approx(0.5 * math.log(2), abs=0.01)


def test_lgmd_identical_latents_is_minus_inf():
    z = torch.ones(3, 4, 4)
    assert lgmd(z) == float("-inf")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 8, generator=g)
    w[2] = w[0]  # one duplicate pair among six is enough
    assert lgmd(w) == float("-inf")


def test_lgmd_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        lgmd(torch.randn(1, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        lgmd(torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="dimension"):
        lgmd(torch.randn(4))


# ----------------------------------------------------------------------------------------------
# Cosine diversity
# ----------------------------------------------------------------------------------------------


def test_cosine_diversity_identical_orthogonal_opposite():
    f = torch.tensor([1.0, -2.0, 0.5])
    assert cosine_diversity(torch.stack([f, f, 2 * f])) == pytest.approx(0.0, abs=1e-12)
    assert cosine_diversity(torch.diag(torch.tensor([1.0, 5.0, 0.1, 2.0]))) == pytest.approx(1.0, abs=1e-12)
    assert cosine_diversity(torch.stack([f, -f])) == pytest.approx(2.0, abs=1e-12)


def test_cosine_diversity_by_hand():
    f = [[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]]
    # cos(f0, f1) = 1/sqrt2, cos(f0, f2) = 0, cos(f1, f2) = -3 / (sqrt2 * 3) = -1/sqrt2.
    # Ordered pairs i != j: each unordered pair twice, so the mean over 6 = mean over the 3.
    expected = ((1 - 1 / math.sqrt(2)) + (1 - 0) + (1 + 1 / math.sqrt(2))) / 3
    assert cosine_diversity(np.array(f)) == pytest.approx(expected, abs=1e-12)


def test_cosine_diversity_bad_input():
    with pytest.raises(ValueError, match="all zeros"):
        cosine_diversity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="N >= 2"):
        cosine_diversity(torch.tensor([[1.0, 0.0]]))


# ----------------------------------------------------------------------------------------------
# Toy mode metrics
# ----------------------------------------------------------------------------------------------

CENTERS = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])


def test_assign_modes_and_masses_hand_placed():
    x = torch.tensor([[0.1, 0.0], [3.9, 0.2], [4.2, -0.1], [0.3, 3.5], [-0.2, 0.1]])
    idx = assign_modes(x, CENTERS)
    assert idx.dtype == torch.long
    assert idx.tolist() == [0, 1, 1, 2, 0]
    masses = mode_masses(x, CENTERS)
    assert masses.tolist() == pytest.approx([0.4, 0.4, 0.2], abs=1e-12)
    # A mode with no sample gets mass 0 but still appears (M entries).
    assert mode_masses(x[:3], CENTERS).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0], abs=1e-12)


def test_mode_entropy_uniform_onehot_restricted():
    assert mode_entropy(torch.full((4,), 0.25), [0, 1, 2, 3]) == pytest.approx(1.0, abs=1e-12)
    assert mode_entropy(torch.tensor([0.0, 1.0, 0.0]), [0, 1, 2]) == pytest.approx(0.0, abs=1e-12)
    masses = torch.tensor([0.5, 0.25, 0.25])
    # Restricted to modes 1 and 2 and renormalised: (1/2, 1/2) -> 1.
    assert mode_entropy(masses, [1, 2]) == pytest.approx(1.0, abs=1e-12)
    # Restricted to modes 0 and 1: (2/3, 1/3).
    p = [2 / 3, 1 / 3]
    expected = -sum(v * math.log(v) for v in p) / math.log(2)
    assert mode_entropy(masses, torch.tensor([0, 1])) == pytest.approx(expected, abs=1e-12)
    # No sample in the chosen modes: defined as 0.
    assert mode_entropy(torch.tensor([1.0, 0.0, 0.0]), [1, 2]) == 0.0


def test_mode_entropy_bad_input():
    with pytest.raises(ValueError, match="at least 2 modes"):
        mode_entropy(torch.tensor([0.5, 0.5]), [1])
    with pytest.raises(ValueError, match="out of range"):
        mode_entropy(torch.tensor([0.5, 0.5]), [0, 2])
    with pytest.raises(ValueError, match="duplicates"):
        mode_entropy(torch.tensor([0.5, 0.5]), [0, 0])
    with pytest.raises(ValueError, match="sum to 1"):
        mode_entropy(torch.tensor([0.5, 0.6]), [0, 1])


def test_within_mode_spread_by_hand():
    x = torch.tensor(
        [
            [-1.0, 0.0], [1.0, 0.0],  # mode 0: own mean (0, 0), RMS 1
            [4.0, 1.0], [4.0, 3.0], [4.0, 2.0],  # mode 1: own mean (4, 2), distances 1, 1, 0
            [0.0, 4.0],  # mode 2: one sample, no spread, left out
        ],
        dtype=torch.float64,
    )
    expected = (1.0 + math.sqrt(2 / 3)) / 2
    assert within_mode_spread(x, CENTERS) == pytest.approx(expected, abs=1e-12)
    # Distances to the own mean, not to the center: moving a cluster changes nothing.
    assert within_mode_spread(x + torch.tensor([0.3, -0.2]), CENTERS) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="2 or more"):
        within_mode_spread(torch.tensor([[0.0, 0.0], [4.0, 0.0]]), CENTERS)


def test_total_variation_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = np.array([0.2, 0.3, 0.5])
    assert total_variation(p, q) == pytest.approx(0.3, abs=1e-12)
    assert total_variation(p, p) == 0.0
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sum to 1"):
        total_variation(torch.tensor([0.5, 0.3]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="modes"):
        total_variation(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.25, 0.25]))


@pytest.mark.parametrize("n0,n1", [(20, 20), (30, 10)])
def test_tilted_masses_two_modes_constant_rewards(n0, n1):
    # Base samples split n0 / n1 over two modes, reward r1 on mode 0 and r2 on mode 1:
    # q(mode m) = n_m exp(beta r_m) / (n0 exp(beta r1) + n1 exp(beta r2)).
    g = torch.Generator().manual_seed(4)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    x = torch.cat([centers[0] + 0.1 * torch.randn(n0, 2, generator=g), centers[1] + 0.1 * torch.randn(n1, 2, generator=g)])
    r1, r2, beta = 0.3, 1.1, 2.0
    rewards = torch.cat([torch.full((n0,), r1, dtype=torch.float64), torch.full((n1,), r2, dtype=torch.float64)])
    a, b = n0 * math.exp(beta * r1), n1 * math.exp(beta * r2)
    masses = tilted_mode_masses(x, rewards, beta, centers)
    assert masses.tolist() == pytest.approx([a / (a + b), b / (a + b)], abs=1e-12)
    # beta = 0: the tilt is the base distribution itself.
    assert tilted_mode_masses(x, rewards, 0.0, centers).tolist() == pytest.approx([n0 / (n0 + n1), n1 / (n0 + n1)])
    # Kish ESS = (sum w)^2 / sum w^2 with unnormalised w = exp(beta r).
    e1, e2 = math.exp(beta * r1), math.exp(beta * r2)
    ess = (n0 * e1 + n1 * e2) ** 2 / (n0 * e1**2 + n1 * e2**2)
    assert tilted_ess(rewards, beta) == pytest.approx(ess, rel=1e-12)
    assert tilted_ess(rewards, 0.0) == pytest.approx(n0 + n1, rel=1e-12)


def test_tilted_masses_gaussian_exponential_tilt():
    # p_base = N(0, I), R(x) = x_0: p_base exp(beta R) is N((beta, 0), I), so the mass of the
    # half-plane x_0 > 0 (mode at (1, 0)) is Phi(beta).
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
    beta = 0.5
    masses = tilted_mode_masses(x, x[:, 0], beta, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    phi = 0.5 * (1 + math.erf(beta / math.sqrt(2)))
    assert masses[1].item() == pytest.approx(phi, abs=0.005)
    # ESS of this tilt: N / E[w^2] with w = exp(beta x - beta^2/2) -> N exp(-beta^2).
    assert tilted_ess(x[:, 0], beta) / x.shape[0] == pytest.approx(math.exp(-(beta**2)), rel=0.02)


def test_toy_mode_metrics_keys_and_values():
    centers = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    high = [1, 2, 3]
    g = torch.Generator().manual_seed(6)
    # 20 samples: 9 in mode 1, 10 in mode 2, 1 in mode 3 (5%: exactly the coverage threshold), 0 in mode 0.
    counts = [0, 9, 10, 1]
    x = torch.cat([centers[m] + 0.2 * torch.randn(c, 2, generator=g) for m, c in enumerate(counts)])
    rewards = torch.linspace(0.0, 1.0, 20, dtype=torch.float64)
    target = torch.tensor([0.1, 0.3, 0.3, 0.3], dtype=torch.float64)
    out = toy_mode_metrics(x, rewards, centers, high, target)
    assert set(out) == {
        "mean_reward", "high_mode_mass", "modes_covered", "mode_entropy", "within_mode_spread", "lgmd", "tilted_tv",
    }
    masses = [c / 20 for c in counts]
    p = [masses[m] / sum(masses[1:]) for m in high]
    assert out["mean_reward"] == pytest.approx(0.5, abs=1e-12)
    assert out["high_mode_mass"] == pytest.approx(1.0, abs=1e-12)
    assert out["modes_covered"] == 3
    assert out["mode_entropy"] == pytest.approx(-sum(v * math.log(v) for v in p) / math.log(3), abs=1e-12)
    assert out["within_mode_spread"] == pytest.approx(within_mode_spread(x, centers), abs=1e-12)
    assert out["lgmd"] == pytest.approx(lgmd(x), abs=1e-12)
    assert out["tilted_tv"] == pytest.approx(0.5 * sum(abs(a - b) for a, b in zip(masses, target.tolist())), abs=1e-12)
    # Below the threshold (1 of 21 < 5%) mode 3 no longer counts as covered.
    x21 = torch.cat([x, centers[1][None]])
    out21 = toy_mode_metrics(x21, torch.zeros(21), centers, high, target)
    assert out21["modes_covered"] == 2
    with pytest.raises(ValueError, match="rewards"):
        toy_mode_metrics(x, rewards[:5], centers, high, target)


# ----------------------------------------------------------------------------------------------
# DINOv2 (tiny random model built offline)
# ----------------------------------------------------------------------------------------------

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32
    )
    folder = str(tmp_path_factory.mktemp("tiny_dinov2"))
    Dinov2Model(cfg).eval().save_pretrained(folder)
    # The processor config shipped with facebook/dinov2-large.
    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


def _smooth_images(n, h, w, seed):
    """Natural-image-like test input: a bilinear upsample of an 8x8 random grid, on the uint8 lattice."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (img * 255).round() / 255  # exactly representable as uint8 for the PIL processor


def _u8(images):
    """(N, 3, H, W) in [0, 1] -> N uint8 (H, W, 3) arrays, what the processor reads."""
    return [(im * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for im in images]


def _dinov2_by_hand(images):
    """DINOv2's preprocessing re-derived in float torch: shorter side -> 256 (the longer
    int(256 * long / short)), antialiased bicubic (PIL's kernel, a = -0.5), clipped as a uint8 image
    clips, center crop 224 at offset (size - 224) // 2, ImageNet mean / std."""
    h, w = images.shape[-2:]
    size = (256, int(256 * w / h)) if h <= w else (int(256 * h / w), 256)
    x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
    return (x[:, :, top:top + 224, left:left + 224] - MEAN) / STD  # (N, 3, 224, 224)


@pytest.mark.parametrize("hw", [(512, 512), (300, 400), (97, 64)])
def test_dinov2_processor_is_dinov2s_preprocessing(tiny_dino_dir, hw):
    from transformers import AutoImageProcessor

    dino = metrics.load_dinov2(tiny_dino_dir)
    images = _smooth_images(2, *hw, seed=hw[0])
    ours = dino.processor(images=_u8(images), return_tensors="pt").pixel_values
    # the processor load_dinov2 builds is the one facebook/dinov2-large ships (the tiny folder holds its config)
    ref = AutoImageProcessor.from_pretrained(tiny_dino_dir)(images=_u8(images), return_tensors="pt").pixel_values
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    # ... and it is the definition: the PIL processor rounds to uint8 after each of its two resize
    # passes, the hand version stays in float. Measured: max ~1.1 uint8 levels, mean ~0.3. A one-pixel
    # crop or resize-size error would show as several levels (neighbouring pixels differ by ~8 levels).
    levels = (ours - _dinov2_by_hand(images)).abs() * STD * 255  # back to uint8 units
    assert ours.shape == (2, 3, 224, 224) and levels.max().item() < 1.5 and levels.mean().item() < 0.5


def test_dinov2_features_equal_direct_model_call(tiny_dino_dir):
    from transformers import AutoImageProcessor, Dinov2Model

    images = _smooth_images(3, 64, 64, seed=7)
    dino = metrics.load_dinov2(tiny_dino_dir, batch_size=2)  # 2 chunks for 3 images
    feats = dino(images)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32

    model = Dinov2Model.from_pretrained(tiny_dino_dir).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_dino_dir)
    with torch.no_grad():
        out = model(**proc(images=_u8(images), return_tensors="pt"), output_hidden_states=True)
        cls = out.last_hidden_state[:, 0]
        # last_hidden_state is already layer-normed: the encoder's last hidden state through layernorm.
        normed = model.layernorm(out.hidden_states[-1])[:, 0]
        by_hand = model(pixel_values=_dinov2_by_hand(images)).last_hidden_state[:, 0]
    torch.testing.assert_close(feats, cls, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output, cls, rtol=0, atol=0)
    torch.testing.assert_close(normed, cls, rtol=1e-6, atol=1e-6)
    assert (F.cosine_similarity(feats, by_hand, dim=1) > 1 - 1e-5).all()  # the float re-derivation, up to uint8 rounding
    # And a chunk size that covers everything at once gives the same features.
    torch.testing.assert_close(metrics.load_dinov2(tiny_dino_dir, batch_size=8)(images), feats, rtol=1e-5, atol=1e-5)


def test_dinov2_bad_images(tiny_dino_dir):
    dino = metrics.load_dinov2(tiny_dino_dir)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dino(torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="float"):
        dino(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        dino(torch.rand(3, 32, 32))


def test_dinov2_missing_or_wrong_folder(tmp_path, tiny_dino_dir):
    missing = str(tmp_path / "no_such_dinov2")
    with pytest.raises(FileNotFoundError, match="does not exist.*hf download facebook/dinov2-large"):
        metrics.load_dinov2(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*hf download"):
        metrics.load_dinov2(str(empty))
    # A folder whose processor config is not DINOv2's is refused rather than silently re-defined.
    wrong = tmp_path / "wrong_proc"
    wrong.mkdir()
    for name in os.listdir(tiny_dino_dir):
        (wrong / name).write_bytes((open(os.path.join(tiny_dino_dir, name), "rb")).read())
    cfg = json.loads((wrong / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 256, "width": 256}
    (wrong / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="crop_size"):
        metrics.load_dinov2(str(wrong))


def test_metrics_module_imports_without_transformers():
    # The toy imports metrics.py: its module-level imports must be torch / numpy only.
    import ast

    tree = ast.parse(open(metrics.__file__).read())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top <= {"__future__", "json", "math", "os", "numpy", "torch"}, top
