"""TMPO's objective: Softmax Trajectory Balance with a clipped importance-sampled update.

Paper: Li et al. 2026, "Trajectory Matching Policy Optimization", Sec. 4.1 and App. A-B.
Equation numbers are those of EQUATIONS.md in this repository.

TMPO is designed to match a distribution rather than to maximise reward. Within a group of K
trajectories of one prompt it matches the policy's normalised trajectory probabilities p_i to a
target q_i. The advantage A_i = log q_i - log p_i is positive exactly where the policy puts too
little mass (q_i > p_i), and sum_i q_i A_i = KL(q || p) >= 0 (the paper's forward-KL,
mode-covering argument, App. A.2). Two targets:
  * the paper's Boltzmann target q = softmax(beta R) (Eq. 5). Measure before relying on it:
    on-policy, with a theta-independent transition std, E[log P grad log P] = 0, so its expected
    gradient is beta E[R grad log P], reward maximisation; in toy/compare_modes.py it collapses onto
    one mode like GRPO (README);
  * the reward-tilted target q* ~ P_ref exp(beta R), with the reference process (the base model) in
    it: its expected gradient is grad [beta E R - KL(P_theta || P_ref)] and its optimum is the base
    tilted by the reward, which keeps the base's modes (`softmax_tb_advantage`, ref_log_probs).
The policy is moved by a PPO-style clipped loss (Eq. 6, by default with the dual clip of Ye et al.
2020 on the A < 0 branch: `clipped_ratio`) on the trajectory importance ratio rho_i, whose per-step
terms carry the detached RatioNorm correction (Eqs. 7, 30-32).

This file is pure torch: tensors in, tensors out. The sampler that produces trajectories and
their log-probabilities lives in tree_sampler.py; the same functions serve the 2-D toy and FLUX.

    python -c "import tmpo, torch; print(tmpo.softmax_tb_advantage(torch.zeros(4), torch.arange(4.), 1.0))"
    python -m pytest -q tests/test_tmpo.py

Notation (code name -> paper symbol, shape; the last dimension is always the group of K):

| code                | paper                                   | shape        |
| ------------------- | --------------------------------------- | ------------ |
| rewards             | R(tau_i)                                | (..., K)     |
| beta                | beta, reward temperature                | scalar       |
| ref_log_probs       | log P_ref(tau_i), reference (base) model| (..., K)     |
| log_q               | log q_i = log softmax(beta R [+ log P_ref])_i | (..., K) |
| traj_log_probs      | log P_theta(tau_i), Eq. (47)            | (..., K)     |
| log_p               | log p_i = log softmax(log P)_i          | (..., K)     |
| advantages          | A^_i = stopgrad(A_i), Eq. (5)           | (..., K)     |
| mean, old_mean      | mu_theta, mu_old (Eq. 31)               | (T, *event)  |
| x_next              | x_{n+1} = mu_old + s eps                | (T, *event)  |
| std                 | s, transition noise scale               | scalar / (T,)|
| step_log_ratio      | log r~_n (Eq. 32)                       | (T,)         |
| paths               | B_i: transitions of leaf i              | (..., K, L)  |
| log_ratio           | log rho_i (Eq. 7)                       | (..., K)     |
| clip_eps            | epsilon in Eq. (6)                      | scalar       |
| dual_clip           | c, dual-clip cap for A < 0 (not in the paper) | scalar |

Where the paper's text and the mathematics disagree, the code follows the mathematics and says so:
the per-dimension 1/D "mean" reduction of the log-probability (Eq. 49) does NOT cancel in the
softmax of Eq. (5) (softmax is shift-, not scale-invariant). tree_sampler.py therefore takes an
explicit `reduce="mean" | "sum"`; with "mean" (the paper's choice) log P differences shrink by D,
p is close to uniform and A_i ~ log q_i + log K. Both are available; the consequence is documented
in README.md.
"""

from __future__ import annotations

import math

import torch



# ----------------------------------------------------------------------------------------------
# 4.1 Softmax Trajectory Balance: the advantage
# ----------------------------------------------------------------------------------------------


def boltzmann_log_target(rewards: torch.Tensor, beta: float, ref_log_probs: torch.Tensor | None = None) -> torch.Tensor:
    """log q_i over the group: the Boltzmann target (Eq. 5) or the reward-tilted one.

    ref_log_probs None: q(tau) = exp(beta R(tau)) / Z_beta (Eq. 5, App. A.1); restricted to the K
        trajectories of one group the partition function cancels (App. A.1.2): log_softmax(beta R).
    ref_log_probs = log P_ref(tau_i), (..., K): q*(tau) ~ P_ref(tau) exp(beta R(tau)), the
        reference process tilted by the reward (trajectory balance with the reference, as relative
        trajectory balance, Venkatraman et al. 2024): log_softmax(beta R + log P_ref).
    Float64: log P_ref under reduce="sum" is O(D) and only its differences within a group matter.
    """
    logits = beta * rewards.double()  # (..., K)
    if ref_log_probs is not None:
        if ref_log_probs.shape != rewards.shape:
            raise ValueError(f"ref_log_probs {tuple(ref_log_probs.shape)} and rewards {tuple(rewards.shape)} "
                             "must have the same shape (..., K)")
        logits = logits + ref_log_probs.double()
    return torch.log_softmax(logits, dim=-1).float()  # (..., K)


def softmax_tb_advantage(
    traj_log_probs: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    ref_log_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax-TB advantage A_i = log q_i - log p_i, detached (Eq. 5), for either target.

    traj_log_probs: log P_theta(tau_i) of each trajectory (Eq. 47), (..., K).
    rewards: R(tau_i), (..., K).
    ref_log_probs: None for the paper's Boltzmann target q = softmax(beta R) (Eq. 5); log P_ref(tau_i)
        of the same trajectories under the reference process (the base model), (..., K), for the
        reward-tilted target q* ~ P_ref exp(beta R). Then, up to constants of the group,
            A_i = beta R_i + log P_ref(tau_i) - log P_theta(tau_i).

    Identities (tested): sum_i q_i A_i = KL(q || p) >= 0, zero iff p = q; adding a constant to every
    log P, log P_ref or reward of a group leaves A unchanged (softmax is shift-invariant); scaling
    log P (the 1/D of Eq. 49) does change it; a log P_ref constant within the group gives Eq. (5).

    What each target asks of the policy (on-policy expected gradient, K -> infinity). Write
    g(A) = E_{tau ~ P_theta}[A(tau) grad log P_theta(tau)] for the gradient the loss of Eq. (6)
    follows at rho = 1 (the group constants drop out: E[grad log P] = 0).
      * Boltzmann: A = beta R - log P_theta. For Gaussian transitions whose std does not depend on
        theta (CPS, Eq. 9), E[log P_theta grad log P_theta] = 0 (odd moments of the noise), so
        g = beta grad E[R]: reward maximisation with a temperature. Nothing in it keeps modes;
        its fixed point, if one exists, is a point mass on the best reward the policy can reach.
      * Tilted: A = beta R + log P_ref - log P_theta. Since
        grad KL(P_theta || P_ref) = E[(log P_theta - log P_ref) grad log P_theta] (+ E[grad log P] = 0),
            g = grad [ beta E[R] - KL(P_theta || P_ref) ],
        the KL-regularised objective whose maximiser over all distributions is
            P*(tau) = P_ref(tau) exp(beta R(tau)) / Z,
        i.e. the base process tilted by the reward: every mode of the base keeps its mass, scaled by
        exp(beta R). A weight lambda on the log-ratio, A = beta R + lambda (log P_ref - log P_theta),
        is lambda times this advantage at beta / lambda: the optimum becomes P_ref exp(beta R / lambda).
    For a finite group the log-sum-exp normalisers of log q and log p depend on every member; by
    Gaussian integration by parts their contribution to g is -(1/K) E[sum_i (q_i du_i - p_i dl_i)]
    (u = beta R + log P_ref, l = log P_theta, d = derivative w.r.t. the sample): O(1/K)
    (tests/test_tmpo.py measures it).
    """
    if traj_log_probs.shape != rewards.shape:
        raise ValueError(
            f"traj_log_probs {tuple(traj_log_probs.shape)} and rewards {tuple(rewards.shape)} "
            "must have the same shape (..., K)"
        )
    log_q = boltzmann_log_target(rewards, beta, ref_log_probs)  # (..., K)
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


DUAL_CLIP = 3.0  # c of dual-clip PPO (Ye et al. 2020, their default); None = Eq. (6) exactly


def clipped_ratio(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float, dual_clip: float | None = DUAL_CLIP) -> torch.Tensor:
    """The ratio each leaf's objective sees, rho-bar_i, so that the per-leaf objective is rho-bar_i A^_i.

    Eq. (6) per leaf is min(rho A, clip(rho, 1 - eps, 1 + eps) A). Sorting out the min by the sign
    of A (the three cases of Eqs. 33-35):
        A >= 0:  min(rho, 1 + eps) A         (a ratio already above 1 + eps gets no gradient: Case 2)
        A <  0:  max(rho, 1 - eps) A         (below 1 - eps no gradient; ABOVE 1 + eps the unclipped
                                              branch is selected, Case 3, with gradient A rho grad log rho)
    Case 3 is unbounded: one step that moves log rho far (the CPS noise scale t' sin(eta pi / 2)
    shrinks as t' -> 0, so a small change of the mean is a large change of log rho) makes the next
    gradient A rho grad log rho explode, and exp(log rho) overflows to inf, which no grad-norm clip
    repairs (seen in toy/compare_modes.py: NaN parameters after ~300 iterations on some seeds).
    DEPARTURE from Eq. (6), by default: dual-clip PPO (Ye et al. 2020) bounds the A < 0 branch at
    c A, i.e. caps that ratio at c = `dual_clip` (3.0, their default): beyond it the leaf gives no
    gradient, as a clipped leaf does. The trust region and Cases 1-2 are unchanged. dual_clip=None
    is Eq. (6) exactly (its loss overflows once log rho > ~88 with A < 0).
    The clamps act on log rho, before exp: every finite log rho gives a finite ratio and a finite
    gradient (zero outside the clamps), so no inf * 0 = NaN appears in the unselected branch.
    """
    if dual_clip is not None and not dual_clip > 1.0 + clip_eps:
        raise ValueError(f"dual_clip must be > 1 + clip_eps = {1 + clip_eps} (or None for Eq. 6 exactly), got {dual_clip}")
    A = advantages.detach()
    lo_neg = math.log(1.0 - clip_eps)
    hi_neg = math.inf if dual_clip is None else math.log(dual_clip)
    log_rho_bar = torch.where(
        A >= 0,
        log_ratio.clamp(max=math.log(1.0 + clip_eps)),  # A >= 0: min(rho, 1 + eps)
        log_ratio.clamp(min=lo_neg, max=hi_neg),  # A < 0: max(rho, 1 - eps), capped at c (dual clip)
    )
    return torch.exp(log_rho_bar)  # (..., K)


def clipped_surrogate_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                           dual_clip: float | None = DUAL_CLIP) -> torch.Tensor:
    """L = -(1/K) sum_i min(rho_i A^_i, clip(rho_i, 1 - eps, 1 + eps) A^_i), averaged over groups (Eq. 6).

    log_ratio: log rho_i (Eq. 7), (..., K), carries the gradient.
    advantages: A^_i, (..., K), detached (Eq. 5 for TMPO, Eq. 28 for GRPO).
    dual_clip: c, the cap on the ratio of a leaf with A < 0 (see `clipped_ratio`; None = Eq. 6).
    Inside the trust region the gradient is -(1/K) A^_i rho_i grad log rho_i; when the clipped
    branch is selected the trajectory contributes nothing (Eqs. 33-35).
    """
    return -(clipped_ratio(log_ratio, advantages, clip_eps, dual_clip) * advantages.detach()).mean()  # Eq. (6)


def surrogate_log_ratio_weights(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
                                dual_clip: float | None = DUAL_CLIP) -> torch.Tensor:
    """dL/d(log rho_i) of Eq. (6), detached, same shape as log_ratio.

    Because log rho_i is a sum over the transitions of trajectory i (Eq. 7), the gradient of the
    loss is sum_i w_i grad log rho_i = sum_j (sum_{i through j} w_i) grad log r~_j: every transition
    j of the tree needs only the summed weight of the leaves below it. The chunked update in
    tree_sampler.py back-propagates transition by transition with these weights. They are taken
    from autograd of `clipped_surrogate_loss` itself, so there is one copy of the math.
    """
    log_ratio = log_ratio.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = clipped_surrogate_loss(log_ratio, advantages, clip_eps, dual_clip)
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
