"""TMPO's objective: Softmax Trajectory Balance with a clipped importance-sampled update.

Paper: Li et al. 2026, "Trajectory Matching Policy Optimization", Sec. 4.1 and App. A-B.
Equation numbers are those of ../shared/paper/EQUATIONS.md.

TMPO is designed to match a distribution rather than to maximise reward. Within a group of K
trajectories of one prompt it matches the policy's normalised trajectory probabilities p_i to
the Boltzmann target q_i = softmax(beta R)_i (Eq. 5). The advantage A_i = log q_i - log p_i is
positive exactly where the policy puts too little mass (q_i > p_i), and
sum_i q_i A_i = KL(q || p) >= 0 (the paper's forward-KL, mode-covering argument, App. A.2). Measure before relying on it: on-policy, with a theta-independent transition
std, E[log P grad log P] = 0, so the expected gradient is beta E[R grad log P], reward
maximisation; in toy/compare_modes.py TMPO collapses onto one mode like GRPO (README). The
policy is moved by a PPO-style clipped loss (Eq. 6) on the trajectory importance ratio rho_i, whose
per-step terms carry the detached RatioNorm correction (Eqs. 7, 30-32).

This file is pure torch: tensors in, tensors out. The sampler that produces trajectories and
their log-probabilities lives in tree_sampler.py; the same functions serve the 2-D toy and FLUX.

    python -c "import tmpo, torch; print(tmpo.softmax_tb_advantage(torch.zeros(4), torch.arange(4.), 1.0))"
    python -m pytest -q tests/test_tmpo.py

Notation (code name -> paper symbol, shape; the last dimension is always the group of K):

| code                | paper                          | shape        |
| ------------------- | ------------------------------ | ------------ |
| rewards             | R(tau_i)                       | (..., K)     |
| beta                | beta, reward temperature       | scalar       |
| log_q               | log q_i = log softmax(beta R)_i| (..., K)     |
| traj_log_probs      | log P_theta(tau_i), Eq. (47)   | (..., K)     |
| log_p               | log p_i = log softmax(log P)_i | (..., K)     |
| advantages          | A^_i = stopgrad(A_i), Eq. (5)  | (..., K)     |
| mean, old_mean      | mu_theta, mu_old (Eq. 31)      | (T, *event)  |
| x_next              | x_{n+1} = mu_old + s eps       | (T, *event)  |
| std                 | s, transition noise scale      | scalar / (T,)|
| step_log_ratio      | log r~_n (Eq. 32)              | (T,)         |
| paths               | B_i: transitions of leaf i     | (..., K, L)  |
| log_ratio           | log rho_i (Eq. 7)              | (..., K)     |
| clip_eps            | epsilon in Eq. (6)             | scalar       |

Where the paper's text and the mathematics disagree, the code follows the mathematics and says so:
the per-dimension 1/D "mean" reduction of the log-probability (Eq. 49) does NOT cancel in the
softmax of Eq. (5) (softmax is shift-, not scale-invariant). tree_sampler.py therefore takes an
explicit `reduce="mean" | "sum"`; with "mean" (the paper's choice) log P differences shrink by D,
p is close to uniform and A_i ~ log q_i + log K. Both are available; the consequence is documented
in README.md.
"""

from __future__ import annotations

import torch

__all__ = [
    "boltzmann_log_target",
    "softmax_tb_advantage",
    "grpo_advantage",
    "group_zscore",
    "ratio_norm_log_ratio",
    "gaussian_kl",
    "clipped_surrogate_loss",
    "surrogate_log_ratio_weights",
    "beta_schedule",
]


# ----------------------------------------------------------------------------------------------
# 4.1 Softmax Trajectory Balance: the advantage
# ----------------------------------------------------------------------------------------------


def boltzmann_log_target(rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """log q_i = log softmax(beta R)_i over the group (Eq. 5, App. A.1).

    The Boltzmann target q(tau) = exp(beta R(tau)) / Z_beta restricted to the K trajectories of one
    group: the partition function Z_beta cancels in the within-group normalisation (App. A.1.2).
    """
    return torch.log_softmax(beta * rewards.float(), dim=-1)  # (..., K)


def softmax_tb_advantage(
    traj_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    use_log_p: bool = True,
) -> torch.Tensor:
    """Softmax-TB advantage A_i = log q_i - log p_i, detached (Eq. 5).

    traj_log_probs: log P_theta(tau_i) of each trajectory (Eq. 47), (..., K).
    rewards: R(tau_i), (..., K).
    use_log_p: False drops the -log p_i term (A_i = log q_i), a control used by the toy to test
        how much of TMPO's behaviour comes from the policy term.

    Identity (tested): sum_i q_i A_i = KL(q || p) >= 0, zero iff p = q. Adding a constant to every
    log P or every reward of a group leaves A unchanged (softmax is shift-invariant); scaling log P
    (the 1/D of Eq. 49) does change it.
    """
    if traj_log_probs.shape != rewards.shape:
        raise ValueError(
            f"traj_log_probs {tuple(traj_log_probs.shape)} and rewards {tuple(rewards.shape)} "
            "must have the same shape (..., K)"
        )
    log_q = boltzmann_log_target(rewards, beta)  # (..., K)
    if not use_log_p:
        return log_q.detach()
    # p_i = P(tau_i) / sum_j P(tau_j): the group normalisation of the policy's trajectory
    # probabilities; in float64 (tree_sampler returns log P in float64) because log P under
    # reduce="sum" is O(D) in magnitude and only its differences within the group matter.
    log_p = torch.log_softmax(traj_log_probs.double(), dim=-1).float()  # (..., K)
    return (log_q - log_p).detach()  # Eq. (5)


def group_zscore(x: torch.Tensor, eps: float = 1e-4, dim: int = -1) -> torch.Tensor:
    """(x - mean) / (std + eps) within the group (population std, as Flow-GRPO's np.std)."""
    mean = x.mean(dim=dim, keepdim=True)
    std = x.std(dim=dim, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def grpo_advantage(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's z-scored advantage (Eq. 28), the reward-maximisation baseline.

    It does not depend on the policy's probabilities at all, so a mode the policy has dropped
    gets no restoring signal (compare Eq. 5).
    """
    return group_zscore(rewards.float(), eps=eps).detach()  # Eq. (28)


# ----------------------------------------------------------------------------------------------
# App. B: importance ratio with RatioNorm
# ----------------------------------------------------------------------------------------------


def _reduce_dims(x: torch.Tensor, reduce: str) -> torch.Tensor:
    """Sum or average over every dimension but the first: (T, *event) -> (T,)."""
    if reduce == "sum":
        return x.flatten(1).sum(dim=1)
    if reduce == "mean":
        return x.flatten(1).mean(dim=1)
    raise ValueError(f"reduce must be 'sum' (log-density, Eq. 48) or 'mean' (1/D, Eq. 49), got {reduce!r}")


def ratio_norm_log_ratio(
    mean: torch.Tensor,
    old_mean: torch.Tensor,
    x_next: torch.Tensor,
    std,
    reduce: str = "sum",
    ratio_norm: bool = True,
    paths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-step log-ratios log r~_n (Eqs. 30-32), optionally summed along trajectories (Eq. 7).

    mean: mu_theta(x_n) at the current parameters, with grad, (T, *event).
    old_mean: mu_old(x_n) recorded at rollout, (T, *event).
    x_next: the sampled x_{n+1} = mu_old + s * eps, (T, *event).
    std: the transition's noise scale s (python float, 0-d tensor or (T,)); it does not depend on
        theta (Eqs. 9, 39).
    reduce: "sum" for the true log-density ratio (Eq. 48) or "mean" for the paper's per-dimension
        form (Eq. 49); the RatioNorm correction is divided by D too, so both stay on one scale.
    ratio_norm: add the detached correction of Eq. (32) (False gives plain Eq. 31).
    paths: optional (..., K, L) long indices into the T transitions: the L stochastic transitions of
        each trajectory. Given, the result is log rho = sum over the path (Eq. 7), shape (..., K).

    log r_n = log N(x'; mu_theta, s^2) - log N(x'; mu_old, s^2) is computed in the form of Eq. (31),
        log r_n = (Delta_mu . eps) / s - ||Delta_mu||^2 / (2 s^2),   Delta_mu = mu_theta - mu_old,
    rather than as a difference of two log-densities: those are O(D) large and nearly equal, and
    their difference would lose most of its digits in float32.
    """
    delta = mean.float() - old_mean.float()  # (T, *event), Delta_mu
    s = torch.as_tensor(std, dtype=torch.float32, device=delta.device)
    s = s.reshape(-1, *([1] * (delta.dim() - 1))) if s.dim() > 0 else s  # broadcast over event dims
    eps = (x_next.float() - old_mean.float()) / s  # (T, *event), the rollout's standard noise
    shift = _reduce_dims(delta.pow(2) / (2 * s**2), reduce)  # (T,), ||Delta_mu||^2 / (2 s^2)
    log_r = _reduce_dims(delta * eps / s, reduce) - shift  # Eq. (31)
    if ratio_norm:
        log_r = log_r + shift.detach()  # Eq. (32): zero mean under the old policy, symmetric clip
    if paths is None:
        return log_r  # (T,)
    return log_r[paths].sum(dim=-1)  # Eq. (7): (..., K, L) -> (..., K)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std, reduce: str = "sum") -> torch.Tensor:
    """KL(N(mu, s^2 I) || N(mu_ref, s^2 I)) = ||mu - mu_ref||^2 / (2 s^2) per transition, (T,).

    The KL-to-reference penalty of the GRPO baselines (Flow-GRPO), with the reference = the base
    model (LoRA disabled). TMPO's default weight on it is 0, as in the released configs.
    """
    s = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    s = s.reshape(-1, *([1] * (mean.dim() - 1))) if s.dim() > 0 else s
    return _reduce_dims((mean.float() - ref_mean.float()).pow(2) / (2 * s**2), reduce)


# ----------------------------------------------------------------------------------------------
# Eq. (6): the clipped loss
# ----------------------------------------------------------------------------------------------


def clipped_surrogate_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """L = -(1/K) sum_i min(rho_i A^_i, clip(rho_i, 1 - eps, 1 + eps) A^_i), averaged over groups (Eq. 6).

    log_ratio: log rho_i (Eq. 7), (..., K), carries the gradient.
    advantages: A^_i, (..., K), detached (Eq. 5 for TMPO, Eq. 28 for GRPO).
    Inside the trust region the gradient is -(1/K) A^_i rho_i grad log rho_i; when the clipped
    branch is selected the trajectory contributes nothing (Eqs. 33-35).
    """
    advantages = advantages.detach()
    rho = torch.exp(log_ratio)
    unclipped = rho * advantages
    clipped = torch.clamp(rho, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped).mean()  # Eq. (6)


def surrogate_log_ratio_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """dL/d(log rho_i) of Eq. (6), detached, same shape as log_ratio.

    Because log rho_i is a sum over the transitions of trajectory i (Eq. 7), the gradient of the
    loss is sum_i w_i grad log rho_i = sum_j (sum_{i through j} w_i) grad log r~_j: every transition
    j of the tree needs only the summed weight of the leaves below it. The chunked update in
    tree_sampler.py back-propagates transition by transition with these weights. They are taken
    from autograd of `clipped_surrogate_loss` itself, so there is one copy of the math.
    """
    log_ratio = log_ratio.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = clipped_surrogate_loss(log_ratio, advantages, clip_eps)
        (weights,) = torch.autograd.grad(loss, log_ratio)
    return weights


def beta_schedule(step: int, beta_start: float, beta_end: float, warmup_steps: int) -> float:
    """Reward temperature beta warmed up linearly from beta_start to beta_end over warmup_steps.

    A flat target early (small beta) and a sharper one later; the released configs use
    0.8 -> 2.0 over 150 steps (100 for OCR) on within-group z-scored rewards (Sec. 4.1).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return float(beta_end)
    frac = min(max(step, 0) / warmup_steps, 1.0)
    return float(beta_start + frac * (beta_end - beta_start))
