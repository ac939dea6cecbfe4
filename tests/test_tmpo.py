"""Closed-form and property tests of tmpo.py: each re-derives the paper's equation independently."""

import math

import pytest
import torch

import tmpo

torch.set_num_threads(1)


def test_boltzmann_target_is_softmax_of_beta_r():
    R = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]])
    beta = 0.7
    expected = torch.exp(beta * R) / torch.exp(beta * R).sum(-1, keepdim=True)  # q_i, Eq. (5)
    assert torch.allclose(tmpo.boltzmann_log_target(R, beta).exp(), expected, atol=1e-6)


def test_advantage_is_log_q_minus_log_p_and_detached():
    R = torch.tensor([0.5, -1.0, 2.0, 0.0])
    logP = torch.tensor([-3.0, -1.0, -2.0, -5.0], requires_grad=True)
    A = tmpo.softmax_tb_advantage(logP, R, beta=1.3)
    q = torch.exp(1.3 * R) / torch.exp(1.3 * R).sum()
    p = logP.detach().exp() / logP.detach().exp().sum()
    assert torch.allclose(A, q.log() - p.log(), atol=1e-5)
    assert not A.requires_grad


def test_q_weighted_advantage_is_forward_kl():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        R = torch.randn(8, generator=g)
        logP = 3 * torch.randn(8, generator=g)
        A = tmpo.softmax_tb_advantage(logP, R, beta=2.0)
        q = tmpo.boltzmann_log_target(R, 2.0).exp()
        p = torch.softmax(logP, -1)
        kl = (q * (q.log() - p.log())).sum()  # KL(q || p) computed from its definition
        assert torch.allclose((q * A).sum(), kl, atol=1e-5)
        assert (q * A).sum() >= 0
    # zero iff p = q: choose log P = beta R (+ any constant)
    R = torch.randn(6, generator=g)
    A = tmpo.softmax_tb_advantage(2.0 * R + 17.0, R, beta=2.0)
    assert torch.allclose(A, torch.zeros(6), atol=1e-5)


def test_dropped_mode_gets_unbounded_restoring_signal():
    R = torch.tensor([1.0, 1.0, 1.0])
    for drop in [-10.0, -100.0, -1000.0]:
        A = tmpo.softmax_tb_advantage(torch.tensor([0.0, 0.0, drop]), R, beta=1.0)
        assert A[2] > -drop - 2  # A ~ -log p -> +inf as p -> 0


def test_advantage_invariant_to_constant_shift_but_not_to_scaling():
    g = torch.Generator().manual_seed(1)
    R = torch.randn(2, 5, generator=g)
    logP = torch.randn(2, 5, generator=g)
    A = tmpo.softmax_tb_advantage(logP, R, 1.5)
    assert torch.allclose(tmpo.softmax_tb_advantage(logP + 123.4, R, 1.5), A, atol=1e-5)
    assert torch.allclose(tmpo.softmax_tb_advantage(logP, R - 7.0, 1.5), A, atol=1e-5)
    # Eq. (49)'s 1/D is a scaling of log P: it does NOT cancel (the paper's claim is wrong)
    A_scaled = tmpo.softmax_tb_advantage(logP / 1000.0, R, 1.5)
    assert not torch.allclose(A_scaled, A, atol=1e-2)
    # with log P / D -> 0, p is uniform and A -> log q + log K
    assert torch.allclose(A_scaled, tmpo.boltzmann_log_target(R, 1.5) + math.log(5), atol=1e-2)


def test_advantage_without_log_p_is_log_q():
    R = torch.tensor([0.0, 1.0, 2.0])
    A = tmpo.softmax_tb_advantage(torch.tensor([5.0, -3.0, 0.0]), R, 1.0, use_log_p=False)
    assert torch.allclose(A, tmpo.boltzmann_log_target(R, 1.0))


def test_grpo_advantage_is_zscore():
    R = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    m, s = R.mean(), R.std(unbiased=False)
    assert torch.allclose(tmpo.grpo_advantage(R, eps=1e-4), (R - m) / (s + 1e-4))
    # no dependence on the policy: same rewards, same advantage (Eq. 28)
    assert torch.allclose(tmpo.grpo_advantage(R + 4.0), tmpo.grpo_advantage(R), atol=1e-6)


def test_ratio_norm_log_ratio_matches_density_ratio_and_corrects_bias():
    torch.manual_seed(0)
    T, D, s = 4000, 3, 0.3
    old_mean = torch.randn(T, D)
    delta = torch.tensor([0.05, -0.1, 0.02])
    mean = old_mean + delta
    x_next = old_mean + s * torch.randn(T, D)
    # Eq. (31) equals log N(x'; mu, s^2) - log N(x'; mu_old, s^2), from torch.distributions
    plain = tmpo.ratio_norm_log_ratio(mean, old_mean, x_next, s, reduce="sum", ratio_norm=False)
    ref = (torch.distributions.Normal(mean, s).log_prob(x_next) - torch.distributions.Normal(old_mean, s).log_prob(x_next)).sum(-1)
    assert torch.allclose(plain, ref, atol=1e-4)
    # uncorrected log-ratio is biased by -||dmu||^2/(2 s^2) under the old policy ...
    bias = float(delta.pow(2).sum() / (2 * s * s))
    assert abs(plain.mean().item() + bias) < 0.05
    # ... RatioNorm (Eq. 32) removes it: mean ~0
    corrected = tmpo.ratio_norm_log_ratio(mean, old_mean, x_next, s, reduce="sum", ratio_norm=True)
    assert abs(corrected.mean().item()) < 0.05
    assert torch.allclose(corrected - plain, torch.full((T,), bias), atol=1e-5)
    # "mean" reduction divides both parts by D
    per_dim = tmpo.ratio_norm_log_ratio(mean, old_mean, x_next, s, reduce="mean", ratio_norm=True)
    assert torch.allclose(per_dim, corrected / D, atol=1e-6)


def test_ratio_norm_gradient_flows_only_through_log_r():
    old_mean = torch.zeros(2, 2)
    x_next = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    delta = torch.tensor([[0.2, 0.1], [-0.1, 0.05]], requires_grad=True)
    s = 0.5
    lr = tmpo.ratio_norm_log_ratio(old_mean + delta, old_mean, x_next, s, reduce="sum")
    lr.sum().backward()
    # d/d delta of (delta . eps / s - |delta|^2 / (2 s^2)), the correction being a constant
    expected = x_next / s**2 - delta.detach() / s**2
    assert torch.allclose(delta.grad, expected, atol=1e-5)


def test_ratio_norm_paths_sum_along_trajectories():
    T = 5
    old_mean = torch.zeros(T, 1)
    x_next = torch.arange(T, dtype=torch.float32).view(T, 1) * 0.1
    mean = old_mean + 0.05
    per_step = tmpo.ratio_norm_log_ratio(mean, old_mean, x_next, 0.5)
    paths = torch.tensor([[0, 2], [1, 2], [3, 4]])
    traj = tmpo.ratio_norm_log_ratio(mean, old_mean, x_next, 0.5, paths=paths)
    assert torch.allclose(traj, per_step[paths].sum(-1))


def test_clipped_loss_cases():
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_rho = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    loss = tmpo.clipped_surrogate_loss(log_rho, A, 0.2)
    # min(rho A, clip(rho) A): [1.2, 0.5, -1.5, -0.8]
    assert torch.allclose(loss, -torch.tensor([1.2, 0.5, -1.5, -0.8]).mean())
    loss.backward()
    # clipped branch selected -> no gradient (Case 2); unclipped -> -(1/K) A rho (Cases 1, 3)
    expected = -torch.tensor([0.0, 0.5, -1.5, 0.0]) / 4
    assert torch.allclose(log_rho.grad, expected)
    w = tmpo.surrogate_log_ratio_weights(log_rho, A, 0.2)
    assert torch.allclose(w, expected)


def test_beta_schedule_linear_warmup():
    assert tmpo.beta_schedule(0, 0.8, 2.0, 150) == pytest.approx(0.8)
    assert tmpo.beta_schedule(75, 0.8, 2.0, 150) == pytest.approx(1.4)
    assert tmpo.beta_schedule(150, 0.8, 2.0, 150) == pytest.approx(2.0)
    assert tmpo.beta_schedule(1000, 0.8, 2.0, 150) == pytest.approx(2.0)
    assert tmpo.beta_schedule(3, 0.8, 2.0, 0) == pytest.approx(2.0)


def test_gaussian_kl_closed_form():
    mean, ref = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    kl = tmpo.gaussian_kl(mean, ref, 0.5)
    p, q = torch.distributions.Normal(mean, 0.5), torch.distributions.Normal(ref, 0.5)
    assert torch.allclose(kl, torch.distributions.kl_divergence(p, q).sum(-1))
