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


def _eq6_reference(log_rho, A, eps):
    """Eq. (6) per leaf written as the paper writes it: min(rho A, clip(rho, 1-eps, 1+eps) A)."""
    rho = torch.exp(log_rho)
    return torch.minimum(rho * A, torch.clamp(rho, 1 - eps, 1 + eps) * A)


def test_clipped_loss_cases():
    A = torch.tensor([1.0, 1.0, -1.0, -1.0])
    log_rho = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    loss = tmpo.clipped_surrogate_loss(log_rho, A, 0.2, dual_clip=None)
    # min(rho A, clip(rho) A): [1.2, 0.5, -1.5, -0.8]
    assert torch.allclose(loss, -torch.tensor([1.2, 0.5, -1.5, -0.8]).mean())
    loss.backward()
    # clipped branch selected -> no gradient (Case 2); unclipped -> -(1/K) A rho (Cases 1, 3)
    expected = -torch.tensor([0.0, 0.5, -1.5, 0.0]) / 4
    assert torch.allclose(log_rho.grad, expected)
    w = tmpo.surrogate_log_ratio_weights(log_rho, A, 0.2, dual_clip=None)
    assert torch.allclose(w, expected)


def test_clipped_loss_without_dual_clip_is_eq6_and_with_it_caps_case_3():
    g = torch.Generator().manual_seed(3)
    log_rho = 0.8 * torch.randn(4000, generator=g)  # rho from ~0.1 to ~10
    A = torch.randn(4000, generator=g)
    for dual_clip in (None, 3.0):
        lr = log_rho.clone().requires_grad_(True)
        tmpo.clipped_surrogate_loss(lr, A, 0.2, dual_clip=dual_clip).backward()
        lr_ref = log_rho.clone().requires_grad_(True)
        per_leaf = _eq6_reference(lr_ref, A, 0.2)
        if dual_clip is not None:  # Ye et al. 2020: for A < 0, max(Eq. 6, c A)
            per_leaf = torch.where(A < 0, torch.maximum(per_leaf, dual_clip * A), per_leaf)
        (-per_leaf.mean()).backward()
        assert torch.allclose(lr.grad, lr_ref.grad, atol=1e-7)
    # the dual clip changes only leaves with A < 0 and rho > c: exactly those get no gradient
    capped = (A < 0) & (log_rho.exp() > 3.0)
    assert capped.sum() > 50 and (lr.grad[capped] == 0).all()
    with pytest.raises(ValueError, match="dual_clip"):
        tmpo.clipped_surrogate_loss(log_rho, A, 0.2, dual_clip=1.1)


@pytest.mark.parametrize("log_rho", [1000.0, -1000.0, 88.5, -88.5, 0.0])
@pytest.mark.parametrize("adv", [1.0, -1.0, 0.0])
def test_clipped_loss_and_gradient_are_finite_for_any_finite_log_ratio(log_rho, adv):
    # The paper's min() form computes exp(1000) = inf in the unselected branch, and inf * 0 = NaN in
    # its gradient; with A < 0 its selected branch is -inf. The default (dual clip) is finite.
    lr = torch.tensor([log_rho, 0.1], requires_grad=True)
    A = torch.tensor([adv, 0.5])
    loss = tmpo.clipped_surrogate_loss(lr, A, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lr.grad).all()
    w = tmpo.surrogate_log_ratio_weights(lr, A, 0.2)
    assert torch.isfinite(w).all()
    if abs(log_rho) >= 88:  # far outside the trust region: no gradient (A > 0, rho -> 0: A rho -> 0)
        assert abs(lr.grad[0]) < 1e-30


def test_tilted_advantage_closed_form_and_invariances():
    g = torch.Generator().manual_seed(2)
    R, logP, logPref = torch.randn(3, 6, generator=g), 5 * torch.randn(3, 6, generator=g), 5 * torch.randn(3, 6, generator=g)
    A = tmpo.softmax_tb_advantage(logP, R, 1.7, ref_log_probs=logPref)
    u = 1.7 * R.double() + logPref.double()
    expected = (u - u.logsumexp(-1, keepdim=True)) - (logP.double() - logP.double().logsumexp(-1, keepdim=True))
    assert torch.allclose(A.double(), expected, atol=1e-5)
    # A_i = beta R_i + log P_ref_i - log P_i up to one constant per group
    diff = A.double() - (1.7 * R.double() + logPref.double() - logP.double())
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-5)
    # shift invariance in each of the three inputs, per group
    shift = torch.tensor([[3.0], [-40.0], [1e3]])
    for a in (tmpo.softmax_tb_advantage(logP + shift, R, 1.7, ref_log_probs=logPref),
              tmpo.softmax_tb_advantage(logP, R + shift, 1.7, ref_log_probs=logPref),
              tmpo.softmax_tb_advantage(logP, R, 1.7, ref_log_probs=logPref + shift)):
        assert torch.allclose(a, A, atol=1e-4)
    # a reference constant within each group gives Eq. (5) back
    const = torch.tensor([[-7.0], [2.0], [1e4]]).expand(3, 6)
    assert torch.allclose(tmpo.softmax_tb_advantage(logP, R, 1.7, ref_log_probs=const),
                          tmpo.softmax_tb_advantage(logP, R, 1.7), atol=1e-4)
    # the forward-KL identity holds for the tilted q as well
    q = tmpo.boltzmann_log_target(R, 1.7, logPref).exp()
    kl = (q * (q.log() - torch.log_softmax(logP, -1))).sum(-1)
    assert torch.allclose((q * A).sum(-1), kl, atol=1e-4)
    with pytest.raises(ValueError, match="ref_log_probs"):
        tmpo.softmax_tb_advantage(logP, R, 1.7, ref_log_probs=logPref[:, :3])


@pytest.mark.parametrize("target", ["tilted", "boltzmann"])
def test_on_policy_expected_gradient_of_each_target(target):
    """Monte Carlo on a 1-D Gaussian policy N(mu, s^2) with reference N(mu_ref, s^2) and the
    quadratic reward R = -(x - a)^2: the mean of A grad_mu log P over on-policy groups is
        tilted:    d/dmu [beta E R - KL(P || P_ref)] = -2 beta (mu - a) - (mu - mu_ref) / s^2
        boltzmann: d/dmu [beta E R]                  = -2 beta (mu - a)   (no anchor to the base),
    plus the finite-group bias of the log-sum-exp normalisers, -(1/K) E[sum_i q_i du_i - p_i dl_i]
    (Gaussian integration by parts; u = beta R [+ log P_ref], l = log P), estimated on the same
    samples and small (checked below)."""
    mu, s, mu_ref, a, beta, G, K = 0.3, 0.5, 0.0, 1.0, 1.5, 4000, 32
    gen = torch.Generator().manual_seed(0)
    x = (mu + s * torch.randn(G, K, generator=gen, dtype=torch.float64))  # (G, K) on-policy samples
    log_p = -((x - mu) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
    log_ref = -((x - mu_ref) ** 2) / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)
    R = -((x - a) ** 2)
    ref = log_ref if target == "tilted" else None
    A = tmpo.softmax_tb_advantage(log_p, R, beta, ref_log_probs=ref).double()  # (G, K)
    score = (x - mu) / s**2  # grad_mu log P, (G, K)
    g_hat = (A * score).mean(dim=1)  # (G,) one estimate per group
    # the finite-group bias, per group
    du = -2 * beta * (x - a) - ((x - mu_ref) / s**2 if target == "tilted" else 0.0)
    dl = -(x - mu) / s**2
    q = tmpo.boltzmann_log_target(R, beta, ref).double().exp()
    p = torch.softmax(log_p, dim=-1)
    bias = -(q * du - p * dl).sum(dim=1) / K  # (G,)
    analytic = -2 * beta * (mu - a) - ((mu - mu_ref) / s**2 if target == "tilted" else 0.0)
    corrected = g_hat - bias
    se = corrected.std() / math.sqrt(G)
    assert abs(corrected.mean().item() - analytic) < 4 * se.item(), (corrected.mean().item(), analytic, se.item())
    assert abs(bias.mean().item()) < 0.1 * abs(analytic)  # the O(1/K) bias is small at K = 32
    assert se < 0.05 * abs(analytic)  # and the test has the power to tell the two targets apart


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
