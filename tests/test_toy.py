"""Tests of the 2-D toy (toy/compare_modes.py): its pieces, and the script run end to end.

    python -m pytest -x -q tests/test_toy.py
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "toy"))

import compare_modes as cm  # noqa: E402
import metrics  # noqa: E402


# ----------------------------------------------------------------------------------------------
# the pieces
# ----------------------------------------------------------------------------------------------


def test_reward_is_largest_and_equal_on_the_high_mode_centres():
    cfg = cm.Config()
    centers = cm.mode_centers(cfg)
    high = list(cfg.high_modes)
    low = [m for m in range(cfg.num_modes) if m not in high]
    r_centers = cm.reward(centers, cfg)  # (M,)
    # equally good: the same reward on every high-mode centre, and that reward is the bump height 1
    assert torch.allclose(r_centers[high], r_centers[high[0]].expand(len(high)), atol=1e-6)
    assert r_centers[high[0]].item() == pytest.approx(1.0, abs=1e-3)
    # the low modes are lower, not zero (a smooth landscape, not a 0/1 reward)
    assert torch.allclose(r_centers[low], torch.full((len(low),), cfg.low_reward), atol=1e-3)
    # nowhere on a fine grid is the reward higher than on a high-mode centre, and the grid's
    # best points sit next to the high-mode centres
    g = torch.linspace(-cfg.radius - 1, cfg.radius + 1, 401)
    gx, gy = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([gx.flatten(), gy.flatten()], dim=1)  # (401*401, 2)
    r = cm.reward(pts, cfg)
    assert r.max() <= r_centers[high].max() + 1e-6
    best = pts[r > r.max() - 1e-4]
    nearest = metrics.assign_modes(best, centers)
    assert set(nearest.tolist()) == set(high)  # every high mode, and only high modes, has a best point
    assert torch.cdist(best, centers).min(dim=1).values.max() < 0.05


def test_pretrained_base_mode_masses_match_the_mixture_weights():
    cfg = replace(cm.Config(), pretrain_steps=1000)
    base = cm.pretrain_base(cfg, seed=0)
    x = cm.ode_samples(base, cfg, torch.randn(8000, 2, generator=torch.Generator().manual_seed(1)))
    masses = metrics.mode_masses(x, cm.mode_centers(cfg))
    # equal-weight mixture: 1/8 per mode (sampling std with 8000 samples is ~0.004)
    assert torch.allclose(masses, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.02), masses
    # samples land near the ring, not in the middle
    radius = x.norm(dim=1)
    assert (radius - cfg.radius).abs().median() < 0.3


def test_pretraining_is_deterministic_per_seed():
    cfg = replace(cm.Config(), pretrain_steps=20, pretrain_batch=64)
    a, b, c = cm.pretrain_base(cfg, 3), cm.pretrain_base(cfg, 3), cm.pretrain_base(cfg, 4)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)


def test_advantages_differ_only_as_documented():
    cfg = cm.Config()
    g = torch.Generator().manual_seed(0)
    log_p, R = torch.randn(4, 27, generator=g), torch.rand(4, 27, generator=g)
    log_ref = torch.randn(4, 27, generator=g)
    adv = {m: cm.advantages(m, log_p, R, cfg, torch.Generator().manual_seed(1), ref_log_p=log_ref) for m in cm.METHODS[1:]}
    assert torch.equal(adv["grpo"], adv["grpo_kl"])
    assert torch.allclose(adv["grpo"], (R - R.mean(1, keepdim=True)) / (R.std(1, unbiased=False, keepdim=True) + 1e-4), atol=1e-5)
    log_q = torch.log_softmax(cfg.beta * R, dim=1)
    assert torch.allclose(adv["tmpo_no_logp"], log_q, atol=1e-6)
    assert torch.allclose(adv["tmpo"], log_q - torch.log_softmax(log_p, dim=1), atol=1e-5)
    # tilted: the base's log P_ref of each leaf enters the target, log softmax(beta R + log P_ref)
    log_q_tilted = torch.log_softmax(cfg.beta * R + log_ref, dim=1)
    assert torch.allclose(adv["tmpo_tilted"], log_q_tilted - torch.log_softmax(log_p, dim=1), atol=1e-5)
    with pytest.raises(ValueError, match="log P_ref"):
        cm.advantages("tmpo_tilted", log_p, R, cfg, None)
    # shuffled: log q - A is log softmax of a permutation of each group's own log P
    implied = (log_q - adv["tmpo_shuffled_logp"]).exp()  # (G, K) = softmax(permuted log P)
    expected = torch.softmax(log_p, dim=1)
    assert torch.allclose(implied.sort(dim=1).values, expected.sort(dim=1).values, atol=1e-5)
    assert not torch.allclose(implied, expected, atol=1e-3)  # ... and really permuted


def test_every_method_starts_from_the_same_rollout():
    # same sampler, same seeds: before the first update every method sees the same leaves
    cfg = replace(cm.Config(), pretrain_steps=20, pretrain_batch=64, iters=1, curve_samples=16)
    base = cm.pretrain_base(cfg, 0)
    noise = torch.randn(16, 2)
    masses = torch.full((8,), 1 / 8, dtype=torch.float64)
    first = {m: cm.finetune(m, base, cfg, 0, noise, masses)[2]["leaf_reward"][0] for m in cm.METHODS[1:]}
    assert len(set(first.values())) == 1, first


def test_a_diverged_method_is_recorded_and_the_others_still_report(monkeypatch):
    # Make one method's update non-finite (NaN advantages -> NaN parameters after the first step): the
    # seed still finishes, that method is marked diverged at its iteration, every other method reports.
    cfg = replace(cm.Config(), pretrain_steps=30, pretrain_batch=64, iters=3, curve_every=1, eval_samples=64,
                  target_samples=256, curve_samples=32)
    real = cm.advantages

    def poisoned(method, *args, **kw):
        A = real(method, *args, **kw)
        return A * float("nan") if method == "tmpo" else A

    monkeypatch.setattr(cm, "advantages", poisoned)
    result = cm.run_seed(cfg, seed=0, log=lambda s: None)
    per_method = result["metrics"]
    assert per_method["tmpo"] == {"diverged": True, "diverged_at": 0}
    for m in cm.METHODS:
        if m != "tmpo":
            assert per_method[m]["diverged"] is False and set(cm.METRIC_KEYS) <= set(per_method[m]), m
    for m in cm.METHODS:
        per_method[m]["seed"] = 0
    summary = cm.summarize([per_method["tmpo"], dict(per_method["tmpo"], seed=1)])
    assert summary["diverged"] == 2 and summary["mean"] == {}
    table = cm.format_table({m: cm.summarize([per_method[m]]) for m in cm.METHODS},
                            {k: [result["target"][k]] for k in ("mean_reward", "high_mode_mass", "mode_entropy")})
    assert "1/1 (seed 0 at it 0)" in table


def test_without_the_dual_clip_a_large_step_turns_the_loss_non_finite():
    # The reason for the default: at log rho = 100 with A < 0, Eq. (6) exactly has loss -rho A = inf.
    import tmpo

    log_rho, A = torch.tensor([100.0], requires_grad=True), torch.tensor([-1.0])
    assert not torch.isfinite(tmpo.clipped_surrogate_loss(log_rho, A, 0.2, dual_clip=None))
    assert cm.Config().dual_clip == tmpo.DUAL_CLIP
    assert cm.parse_args(["--no-dual-clip"])[0].dual_clip is None


def test_bad_flags_fail_with_a_message():
    with pytest.raises(ValueError, match="--seeds"):
        cm.parse_args(["--seeds", "0"])
    with pytest.raises(ValueError, match="--iters"):
        cm.parse_args(["--iters", "0"])


# ----------------------------------------------------------------------------------------------
# end to end, as a user runs it
# ----------------------------------------------------------------------------------------------


def test_compare_modes_quick_end_to_end(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, os.path.join(ROOT, "toy", "compare_modes.py"), "--quick", "--seed-offset", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for method in cm.METHODS:
        assert method in proc.stdout  # the printed table
    doc = json.loads((out / "metrics.json").read_text())
    seeds = doc["config"]["seeds"]
    assert seeds == 2 and doc["config"]["seed_list"] == [1, 2]
    assert list(doc["methods"]) == list(cm.METHODS)
    for method, entry in doc["methods"].items():
        assert len(entry["per_seed"]) == seeds
        assert entry["diverged"] == 0 and [r["seed"] for r in entry["per_seed"]] == [1, 2]
        assert all(r["diverged"] is False for r in entry["per_seed"])
        rows = [{k: r[k] for k in cm.METRIC_KEYS} for r in entry["per_seed"]] + [entry["mean"], entry["std"]]
        for row in rows:
            assert set(row) == set(cm.METRIC_KEYS), (method, sorted(row))
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in row.values()), (method, row)
        for row in entry["per_seed"]:
            assert 0.0 <= row["mode_entropy"] <= 1.0 + 1e-9 and 0.0 <= row["tilted_tv"] <= 1.0
            assert row["modes_covered"] in range(len(doc["config"]["high_modes"]) + 1)
            assert (row["wall_s"] == 0.0) == (method == "base")
        for key in cm.METRIC_KEYS:  # mean is the mean of the seeds
            assert entry["mean"][key] == pytest.approx(np.mean([r[key] for r in entry["per_seed"]]))
    # the base is an equal-weight ring: half its mass on the 4 high-reward modes, all 4 covered
    for row in doc["methods"]["base"]["per_seed"]:
        assert row["modes_covered"] == 4 and abs(row["high_mode_mass"] - 0.5) < 0.1
    for png in ("samples.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000, (png, len(data))


def test_paper_rewards_zscore_and_warm_up_beta_for_tmpo_only():
    cfg = replace(cm.Config(), paper_rewards=True, iters=400)
    g = torch.Generator().manual_seed(2)
    log_p, R = torch.randn(3, 27, generator=g), torch.rand(3, 27, generator=g)
    Rz = (R - R.mean(1, keepdim=True)) / (R.std(1, unbiased=False, keepdim=True) + 1e-4)
    for it, beta in [(0, 0.8), (75, 1.4), (150, 2.0), (399, 2.0)]:
        A = cm.advantages("tmpo", log_p, R, cfg, torch.Generator().manual_seed(1), it)
        assert torch.allclose(A, torch.log_softmax(beta * Rz, 1) - torch.log_softmax(log_p, 1), atol=1e-5), it
    # GRPO's advantage is already a z-score: unchanged by the flag
    plain = cm.advantages("grpo", log_p, R, cm.Config(), None)
    assert torch.allclose(cm.advantages("grpo", log_p, R, cfg, None, 200), plain)


# ----------------------------------------------------------------------------------------------
# the frontier (toy/frontier.py)
# ----------------------------------------------------------------------------------------------


def test_matched_reward_interpolates_the_first_crossing():
    import frontier

    run = {"reward": [0.4, 0.6, 0.8, 0.75, 0.95], "mode_entropy": [1.0, 0.8, 0.4, 0.5, 0.0], "diverged_at": None}
    assert frontier.at_reward(run, 0.7, "mode_entropy") == pytest.approx(0.6)  # halfway between 0.8 and 0.4
    assert frontier.at_reward(run, 0.3, "mode_entropy") == 1.0  # reached at the first point
    assert frontier.at_reward(run, 0.99, "mode_entropy") is None  # never reached: not filled in
    assert frontier.at_reward(dict(run, diverged_at=3), 0.7, "mode_entropy") is None


def test_frontier_quick_end_to_end(tmp_path):
    out = tmp_path / "frontier"
    cmd = [sys.executable, os.path.join(ROOT, "toy", "frontier.py"), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "H at R = 0.8" in proc.stdout and "reference" in proc.stdout
    doc = json.loads((out / "frontier.json").read_text())
    assert [s["seed"] for s in doc["seeds"]] == [0, 1]
    runs = doc["seeds"][0]["runs"]
    assert {r["method"] for r in runs} == {"grpo", "tmpo", "tmpo_tilted", "grpo_kl"}
    for r in runs:  # every run's curve: one point per curve_every iterations, and the last one
        assert r["iter"] == list(range(0, doc["config"]["iters"] + 1, doc["config"]["curve_every"]))
        assert len(r["reward"]) == len(r["mode_entropy"]) == len(r["tilted_tv"]) == len(r["iter"])
    # every run starts from the same base: the first curve point is the base's
    assert len({(r["reward"][0], r["mode_entropy"][0]) for r in runs}) == 1
    ref = doc["seeds"][0]["reference"]
    assert ref["beta"][0] == 0 and np.all(np.diff(ref["reward"]) > 0)  # E[R] grows with the tilt
    assert ref["tilted_tv"][ref["beta"].index(4.0)] == pytest.approx(0.0, abs=1e-9)  # beta' = 4 is the target
    rows = {(r["method"], r["value"]): r for r in doc["table"]}
    assert set(rows[("tmpo_tilted", 4.0)]["matched"]) == {"0.7", "0.8", "0.9"}
    data = (out / "frontier.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
