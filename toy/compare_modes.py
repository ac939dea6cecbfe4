"""Does TMPO keep the modes that reward maximisation drops? A 2-D experiment that runs on a laptop.

Paper: Li et al. 2026, Sec. 4.1 (Softmax Trajectory Balance, Eq. 5) against the GRPO advantage
(Eq. 28), both sampled with the Dynamic Stochastic Tree of Sec. 4.2 (Eqs. 9, 41-47) and updated
with the clipped loss of Eq. (6)-(7). Equation numbers: EQUATIONS.md in this repository.

The setup, step by step:
  1. Data: an equal-weight mixture of 8 Gaussians on a ring. A velocity MLP v(x, t) is pretrained
     by rectified flow matching (Eq. 2: x_t = (1 - t) x0 + t eps, target eps - x0): the "base".
  2. Reward: a sum of Gaussian bumps, height 1 on 4 of the modes (the "high-reward modes", all
     EQUALLY good by symmetry) and a lower height on the other 4. Smooth, not 0/1.
  3. Target: the reward-tilted base q(x) ~ p_base(x) exp(beta R(x)) (App. A.1), which keeps all
     four high modes with (up to the base's imperfections) equal mass. Estimated by reweighting many base samples
     (metrics.tilted_mode_masses); its effective sample size is printed.
  4. Fine-tuning: every method uses the SAME tree sampler (3 independent roots, 2 SDE branch levels
     with k = 3: 27 leaves per group, branch positions from the curriculum Beta schedule), the same
     groups, iterations, optimizer, learning rate, clip and seeds. Only the advantage differs:
        grpo                GRPO's z-scored reward (Eq. 28)
        tmpo                Softmax-TB, A = log softmax(beta R) - log softmax(log P)  (Eq. 5)
        tmpo_tilted         Softmax-TB with the reward-tilted target q* ~ P_base exp(beta R):
                            A = log softmax(beta R + log P_base) - log softmax(log P), log P_base of
                            each leaf from one extra no-grad forward of the base per SDE parent
        grpo_kl             grpo + kl_coef * KL(policy || base) on the SDE transitions
        tmpo_no_logp        tmpo without the -log p term: A = log q
        tmpo_shuffled_logp  tmpo with log P permuted among the members of each group
     The three controls ask WHY tmpo behaves as it does: is it the anchor to the base (grpo_kl), the
     Boltzmann target log q (tmpo_no_logp), or the policy's own log P of each leaf (shuffling keeps
     the values of log P but breaks their link to the leaves)? tmpo_tilted is the variant the
     mathematics says keeps modes (below).
  5. Evaluation: 4000 ODE samples per method (no branch points), from the same initial noise for
     every method of a seed, scored with metrics.toy_mode_metrics; mean +- std over seeds.

What to expect, on paper. On-policy, with Gaussian transitions whose std does not depend on theta
(CPS, Eq. 9), E[log P(tau) grad log P(tau)] = 0 and a term that is constant within a group has zero
expected score. So, up to finite-group terms (the log-sum-exp normalisers of log q and log p
depend on every member of the group), TMPO's expected gradient is beta E[R grad log P]: the
REINFORCE gradient of the reward, like GRPO's (which divides by the group's std instead). The
-log p term changes the noise of the estimate, not its mean (on-policy, log P of a leaf is
-||eps||^2 / 2 summed over its noises plus a constant: it depends on the noise drawn, not on
theta). With the base in the target, tmpo_tilted's expected gradient is
grad [beta E R - KL(P_theta || P_base)], whose optimum is the tilted base p_base exp(beta R) over the
recorded transitions: it should keep the modes (tmpo.softmax_tb_advantage derives both). Whether
each does is what this script measures; the controls separate the candidate causes.

Deliberate choices (each also stated where it is made):
  * Raw rewards and a FIXED beta (no within-group z-score, no beta warm-up): only then is the
    target p_base exp(beta R) one well-defined distribution that the methods can be compared with.
    (The released FLUX configs z-score rewards per group and warm beta up; see EQUATIONS.md.)
  * reduce="sum": log P is the true log-density of the trajectory (Eq. 48), not the 1/D mean.
  * Two gradient steps per rollout, so that the second step is off-policy and the clip of Eq. (6)
    and RatioNorm (Eq. 32) actually act (on a single on-policy step rho = 1 exactly).
  * The loss of Eq. (6) with the dual clip c = 3 on its A < 0 branch (tmpo.clipped_ratio), for every
    method alike; `--no-dual-clip` gives Eq. (6) exactly. Without it TMPO's parameters turned NaN on
    some seeds (the unbounded Case 3 of Eqs. 33-35).
  * A method whose parameters, leaves or samples turn non-finite is reported as diverged (with the
    iteration) for that seed, and the other methods still report.
  * The KL of grpo_kl is over the recorded SDE transitions only (the deterministic ODE steps have
    no density); its coefficient is chosen from the KL-regularised objective (see Config.kl_coef).
  * Hyperparameters were set once by the reasoning in the Config comments, not tuned per method.

Outputs: a printed table (mean +- std over the seeds that did not diverge, and how many did), and
with --out DIR: DIR/metrics.json (per seed: the metrics, or "diverged": true with "diverged_at"),
DIR/samples.png (samples of every method over the reward landscape, fixed axes, equal aspect,
same noise; plus the tilted target as reweighted base samples) and DIR/training_curves.png
(leaf reward, ODE mode entropy and TV to the target against iteration, mean over seeds, shaded
min-max). Without --out nothing is written. Seeds run in parallel worker processes (--workers,
default 2); every seed is self-contained, so the numbers do not depend on the number of workers.
One operating point cannot rank methods that learn at different speeds: toy/frontier.py compares
them at matched reward.

Metrics (per method and seed; metrics.py):
  mean_reward         mean R of the 4000 ODE samples
  high_mode_mass      fraction of samples nearest to a high-reward mode
  modes_covered       high-reward modes holding >= 5% of the samples (of 4)
  mode_entropy        normalised entropy of the mass over the 4 high-reward modes (1 = even)
  within_mode_spread  mean RMS distance of a mode's samples to their own mean
  lgmd                mean log pairwise distance of the samples (the paper's LGMD with d = 2)
  tilted_tv           TV distance between the mode masses and the target's (0 = matches q)
  wall_s              fine-tuning wall time (training steps only; 0 for base, which is not fine-tuned)

Run (from the repository root):
    python toy/compare_modes.py                        # 4 seeds: about 1 minute on 2 cores (63 s measured)
    python toy/compare_modes.py --quick                # 2 seeds, fewer iterations and samples: about 15 s
    python toy/compare_modes.py --out assets/toy       # + metrics.json and PNG figures
    python toy/compare_modes.py --seeds 20 --out assets/toy_20_seeds   # seeds 0-19: about 6 minutes
    python toy/compare_modes.py --seeds 5 --seed-offset 10 --iters 400
    python toy/compare_modes.py --paper-rewards        # TMPO with z-scored rewards, beta 0.8 -> 2.0 (released configs)
    python -m pytest -q tests/test_toy.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import metrics  # noqa: E402
import tmpo  # noqa: E402
import tree_sampler as ts  # noqa: E402

METHODS = ("base", "grpo", "tmpo", "tmpo_tilted", "grpo_kl", "tmpo_no_logp", "tmpo_shuffled_logp")
METRIC_KEYS = (
    "mean_reward", "high_mode_mass", "modes_covered", "mode_entropy",
    "within_mode_spread", "lgmd", "tilted_tv", "wall_s",
)


@dataclass
class Config:
    """Every knob of the experiment. Lengths are in data units (the ring has radius `radius`)."""

    # -- data and reward ----------------------------------------------------------------------
    num_modes: int = 8  # Gaussians on the ring, equal weights 1 / num_modes
    radius: float = 3.0  # ring radius; adjacent modes are 2 r sin(pi / 8) = 2.3 apart (7.7 mode stds)
    mode_std: float = 0.3  # std of each mixture component
    high_modes: tuple = (0, 2, 4, 6)  # every other mode: 4 equally good modes, symmetric on the ring
    reward_width: float = 0.5  # std of each reward bump; wider than a mode so R varies smoothly inside it
    low_reward: float = 0.4  # bump height on the other modes (high modes: 1.0): lower, not zero
    # -- base model (rectified flow matching, Eq. 2) -------------------------------------------
    hidden: int = 128  # MLP width (3 hidden layers, SiLU)
    pretrain_steps: int = 2000  # Adam steps on fresh mixture samples
    pretrain_batch: int = 512
    pretrain_lr: float = 2e-3  # cosine-decayed to 0
    # -- sampler (Sec. 4.2): the same for every method -----------------------------------------
    num_steps: int = 10  # denoising steps, training and evaluation (unshifted grid)
    k: int = 3  # children per branch point; 3 levels -> k^3 = 27 leaves per group
    branch_early: tuple = (0, 2, 4)  # branch positions at progress 0 (0 = independent roots)
    branch_late: tuple = (0, 5, 7)  # ... and at progress 1 (Eq. 41); valid positions 0..num_steps-2
    kappa: float = 6.0  # Beta concentration of the branch perturbation (Eq. 43), as released
    eta: float = 0.7  # CPS noise level (Eq. 9), as released
    groups: int = 8  # groups (independent trees) per iteration, sampled in one batched rollout
    # -- fine-tuning: the same budget for every method ----------------------------------------
    # iters: rollouts per run. Over seeds 0-19 the methods anchored to the base (tmpo_tilted, grpo_kl)
    # settle within ~100 iterations; grpo and tmpo keep losing entropy slowly (mean mode entropy
    # 0.19 -> 0.16 and 0.48 -> 0.46 from iteration 300 to 400), so the table is a snapshot of a
    # still-collapsing run, and toy/frontier.py compares the methods at matched reward instead.
    iters: int = 400
    updates_per_rollout: int = 2  # gradient steps on each rollout; the 2nd is off-policy (clip acts)
    # lr: Adam, a quarter of the pretraining lr. Adam divides by the gradient's running RMS, so the
    # very different advantage scales (z-scored for GRPO, log-softmax for TMPO) give similar step
    # sizes. At 1e-3 (the earlier default) TMPO's reward random-walked down after its collapse on
    # one of 20 seeds (seed 6 ended at 0.36, below the base's 0.48): once the group's rewards are
    # equal, its advantage is dominated by -log p, noise the policy cannot control, and Adam's
    # normalised steps turn that noise into a drift. 5e-4 halves the step (measured over seeds
    # 0-19 in README); the frontier (toy/frontier.py) compares the methods at matched reward instead.
    lr: float = 5e-4
    clip_eps: float = 0.2  # epsilon of Eq. (6), as released
    # dual_clip: c of dual-clip PPO, the cap on rho for leaves with A < 0 (tmpo.clipped_ratio), for
    # every method alike. Without it (None = Eq. 6 exactly) a leaf with A < 0 and rho >> 1 has the
    # unbounded gradient A rho grad log rho: at lr 1e-3 TMPO's parameters turned NaN at iteration
    # 312 on seed 3. At the default lr it changed no TMPO run of seeds 0-19 (bit-identical results
    # with --no-dual-clip): a safety net, not a knob that shapes the results.
    dual_clip: float | None = tmpo.DUAL_CLIP
    max_grad_norm: float = 1.0  # gradient-norm clip before each Adam step
    reduce: str = "sum"  # log P = true log-density (Eq. 48); "mean" would be Eq. (49)
    # beta: reward temperature of the target exp(beta R) on raw R in [0, 1]. The tilt multiplies a
    # high mode (R ~ 0.8 over most of its samples) against a low one (R ~ 0.3) by about
    # exp(0.5 beta): beta = 4 gives a factor ~7, i.e. ~88% of the target on the high modes vs 50%
    # under the base -- sharper than the base, yet far from a point mass (ESS stays large).
    beta: float = 4.0
    # kl_coef: the KL-regularised objective max E[R] - (1/beta) KL(p || p_base) has exactly the
    # tilted target as its optimum. GRPO's advantage is R / std_group(R), so the matching
    # coefficient on the KL is 1 / (beta * std_group(R)); std_group(R) ~ 0.3 for base rollouts
    # (0.29 measured for seed 0: metrics.json's curves, "leaf_reward_std" at iteration 0, the base's
    # first rollout, the same for every method), hence 1 / (4 * 0.3) ~ 0.8. The match is only
    # approximate: the penalty covers the SDE transitions, not the whole sampling path.
    kl_coef: float = 0.8
    # paper_rewards: the released FLUX configs' reward processing instead of the above: R z-scored
    # within each group and beta warmed up linearly 0.8 -> 2.0 over the first 150 of 400 steps
    # (scaled to --iters). The target then moves with the group, so tilted_tv (still measured
    # against p_base exp(beta R) on raw R) is only indicative; the mode metrics are what to read.
    paper_rewards: bool = False
    # -- evaluation ----------------------------------------------------------------------------
    eval_samples: int = 4000  # ODE samples per method and seed (same noise for every method)
    target_samples: int = 20000  # base samples reweighted to estimate the tilted target
    curve_samples: int = 500  # ODE samples for the mode-entropy curve during training
    curve_every: int = 10  # iterations between two curve points
    seeds: int = 4
    seed_offset: int = 0
    threads: int = 1  # torch threads; for these tiny MLPs 2 threads ran ~5x slower on a 2-core CPU (measured)

    def validate(self):
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {self.iters}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if len(self.high_modes) < 2 or any(not 0 <= m < self.num_modes for m in self.high_modes):
            raise ValueError(f"high_modes {self.high_modes} must name >= 2 of the {self.num_modes} modes")
        if self.eval_samples < 2 or self.curve_samples < 2:
            raise ValueError("eval_samples and curve_samples must be >= 2")


# --quick: a shorter pretraining (a blurrier base), fewer iterations, seeds and samples.
QUICK = dict(seeds=2, pretrain_steps=1000, iters=150, eval_samples=1500, target_samples=8000, curve_samples=300)


# ----------------------------------------------------------------------------------------------
# 1-2. The data, the base model and the reward
# ----------------------------------------------------------------------------------------------


def mode_centers(cfg: Config) -> torch.Tensor:
    """(M, 2) centers on the ring; mode 0 at angle 0, counter-clockwise."""
    angle = 2 * math.pi * torch.arange(cfg.num_modes, dtype=torch.float32) / cfg.num_modes
    return cfg.radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def sample_data(cfg: Config, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of the equal-weight ring mixture, (n, 2)."""
    which = torch.randint(cfg.num_modes, (n,), generator=generator)
    return mode_centers(cfg)[which] + cfg.mode_std * torch.randn(n, 2, generator=generator)


def reward(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """R(x) = sum_m h_m exp(-||x - c_m||^2 / (2 w^2)), h = 1 on high modes, low_reward elsewhere, (N,).

    Equal on every high-mode center (by the ring's symmetry), largest there, smooth everywhere.
    """
    heights = torch.full((cfg.num_modes,), cfg.low_reward)
    heights[list(cfg.high_modes)] = 1.0
    d2 = torch.cdist(x.float(), mode_centers(cfg)).pow(2)  # (N, M)
    return (heights * torch.exp(-d2 / (2 * cfg.reward_width**2))).sum(dim=1)  # (N,)


class VelocityMLP(torch.nn.Module):
    """v_theta(x, t): x (N, 2) and t (N,) in [0, 1] -> (N, 2). `cond` is unused (one "prompt")."""

    def __init__(self, hidden: int):
        super().__init__()
        # Fourier features of t: the velocity field changes quickly in t near the data end.
        self.register_buffer("freqs", math.pi * torch.arange(1, 7, dtype=torch.float32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 1 + 2 * 6, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )

    def forward(self, x, t, cond=None):
        ft = t[:, None] * self.freqs  # (N, 6)
        return self.net(torch.cat([x, t[:, None], ft.sin(), ft.cos()], dim=1))


def pretrain_base(cfg: Config, seed: int) -> VelocityMLP:
    """Rectified flow matching on the mixture (Eq. 2); deterministic given the seed."""
    torch.manual_seed(seed)
    model = VelocityMLP(cfg.hidden)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    for _ in range(cfg.pretrain_steps):
        x0 = sample_data(cfg, cfg.pretrain_batch, gen)  # (B, 2) data
        eps = torch.randn(x0.shape, generator=gen)  # (B, 2) noise
        t = torch.rand(x0.shape[0], generator=gen)  # (B,)
        xt = (1 - t[:, None]) * x0 + t[:, None] * eps  # Eq. (2)
        loss = (model(xt, t) - (eps - x0)).pow(2).sum(dim=1).mean()  # target velocity eps - x0
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False)


@torch.no_grad()
def ode_samples(model, cfg: Config, noise: torch.Tensor) -> torch.Tensor:
    """The sampler with no branch points: num_steps Euler steps from the given noise, (N, 2)."""
    spec = ts.TreeSpec(cfg.num_steps, roots=1)
    ro = ts.rollout(model, spec, ts.sigma_schedule(cfg.num_steps), None, noise.shape[0], (2,), x_root=noise)
    return ro.x0


# ----------------------------------------------------------------------------------------------
# 4. Fine-tuning: one loop, the advantage is the only thing that differs
# ----------------------------------------------------------------------------------------------


def advantages(method: str, log_p: torch.Tensor, R: torch.Tensor, cfg: Config, perm_gen: torch.Generator, it: int = 0,
               ref_log_p: torch.Tensor | None = None):
    """A^ (G, K) for each method from log P (G, K), raw rewards R (G, K) and, for tmpo_tilted, the
    leaves' log P_ref under the base (G, K), at iteration `it`."""
    if method in ("grpo", "grpo_kl"):
        return tmpo.grpo_advantage(R)  # Eq. (28); z-scoring R first would change nothing
    beta = cfg.beta
    if cfg.paper_rewards:  # the released configs: z-scored R, beta 0.8 -> 2.0 over 150 of 400 steps
        R = tmpo.group_zscore(R)
        beta = tmpo.beta_schedule(it, 0.8, 2.0, max(round(cfg.iters * 150 / 400), 1))
    if method == "tmpo":
        return tmpo.softmax_tb_advantage(log_p, R, beta)  # Eq. (5)
    if method == "tmpo_tilted":
        if ref_log_p is None:
            raise ValueError("tmpo_tilted needs the leaves' log P_ref (rollout with ref_velocity_fn)")
        return tmpo.softmax_tb_advantage(log_p, R, beta, ref_log_probs=ref_log_p)  # target P_ref exp(beta R)
    if method == "tmpo_no_logp":
        return tmpo.boltzmann_log_target(R, beta)  # A = log q: Eq. (5) without its -log p term
    if method == "tmpo_shuffled_logp":
        # the same log P values, assigned to random members of their own group
        perm = torch.argsort(torch.rand(log_p.shape, generator=perm_gen), dim=-1)  # (G, K), a permutation per row
        return tmpo.softmax_tb_advantage(log_p.gather(-1, perm), R, beta)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS[1:]}")


def _finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def finetune(method: str, base: VelocityMLP, cfg: Config, seed: int, curve_noise: torch.Tensor, target_masses: torch.Tensor):
    """Fine-tune a copy of `base`; returns (model, wall seconds of training, curves dict, diverged_at).

    diverged_at: the iteration at which the parameters, the leaves or the rewards turned
    non-finite (training of this method stops there, model None), else None. Nothing is clamped:
    a diverged run is reported as such.
    """
    model = copy.deepcopy(base).requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sigmas = ts.sigma_schedule(cfg.num_steps)
    # Same seeds for every method: the first rollout (and every branch schedule) is identical.
    gen = torch.Generator().manual_seed(20_000 + seed)  # rollout noise
    branch_rng = np.random.default_rng(seed)  # branch positions (Eqs. 43-46)
    perm_gen = torch.Generator().manual_seed(30_000 + seed)  # tmpo_shuffled_logp's permutations
    kl = dict(kl_coef=cfg.kl_coef, ref_velocity_fn=base) if method == "grpo_kl" else {}
    reference = base if method == "tmpo_tilted" else None  # log P_ref of every leaf, 12 forwards per group
    curves = {k: [] for k in ("leaf_reward", "leaf_reward_std", "curve_iter", "ode_reward", "ode_mode_entropy",
                              "ode_tilted_tv")}
    high = list(cfg.high_modes)
    centers = mode_centers(cfg)

    def record_curve(it) -> bool:
        x = ode_samples(model, cfg, curve_noise)
        if not torch.isfinite(x).all():
            return False
        masses = metrics.mode_masses(x, centers)
        curves["curve_iter"].append(it)
        curves["ode_reward"].append(round(reward(x, cfg).mean().item(), 5))
        curves["ode_mode_entropy"].append(round(metrics.mode_entropy(masses, high), 5))
        curves["ode_tilted_tv"].append(round(metrics.total_variation(masses, target_masses), 5))
        return True

    wall = 0.0
    for it in range(cfg.iters):
        if it % cfg.curve_every == 0 and not record_curve(it):
            return None, wall, curves, it
        start = time.perf_counter()
        progress = it / max(cfg.iters - 1, 1)
        positions = ts.branch_schedule(progress, cfg.branch_early, cfg.branch_late, cfg.kappa, cfg.num_steps, branch_rng)
        spec = ts.TreeSpec.tree(cfg.num_steps, positions, cfg.k, eta=cfg.eta, kind="cps")
        ro = ts.rollout(model, spec, sigmas, None, cfg.groups, (2,), generator=gen, reduce=cfg.reduce,
                        ref_velocity_fn=reference)
        R = reward(ro.x0, cfg).view(cfg.groups, -1)  # (G*K,) -> (G, K), group-major leaves
        if not (torch.isfinite(R).all() and torch.isfinite(ro.log_prob).all()):
            return None, wall, curves, it
        A = advantages(method, ro.log_prob, R, cfg, perm_gen, it, ro.ref_log_prob if reference else None)  # (G, K)
        for _ in range(cfg.updates_per_rollout):
            opt.zero_grad()
            ts.update(model, ro, None, A, clip_eps=cfg.clip_eps, dual_clip=cfg.dual_clip, reduce=cfg.reduce, **kl)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
        if not _finite(model):
            return None, wall, curves, it
        wall += time.perf_counter() - start
        curves["leaf_reward"].append(round(R.mean().item(), 5))
        curves["leaf_reward_std"].append(round(R.std(dim=1, unbiased=False).mean().item(), 5))  # within-group std
    if not record_curve(cfg.iters):
        return None, wall, curves, cfg.iters
    return model.requires_grad_(False), wall, curves, None


# ----------------------------------------------------------------------------------------------
# 3 + 5. Target and evaluation
# ----------------------------------------------------------------------------------------------


def prepare_seed(cfg: Config, seed: int):
    """The base model of a seed, its tilted target and the fixed noises every method shares.

    Returns (base, target dict, target_masses (M,), target_x (eval_samples, 2) resampled from q,
    eval_noise, curve_noise, pretrain seconds). toy/frontier.py starts from the same.
    """
    t0 = time.perf_counter()
    base = pretrain_base(cfg, seed)
    pretrain_s = time.perf_counter() - t0
    centers, high = mode_centers(cfg), list(cfg.high_modes)
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_noise = torch.randn(cfg.eval_samples, 2, generator=gen)  # shared by every method of this seed
    target_noise = torch.randn(cfg.target_samples, 2, generator=gen)
    curve_noise = torch.randn(cfg.curve_samples, 2, generator=gen)
    # the tilted target q ~ p_base exp(beta R), by self-normalised reweighting of base samples
    xb = ode_samples(base, cfg, target_noise)
    rb = reward(xb, cfg)
    target_masses = metrics.tilted_mode_masses(xb, rb, cfg.beta, centers)  # (M,)
    weights = metrics.tilt_weights(rb, cfg.beta)  # (N,) importance weights of q w.r.t. p_base
    target = {
        "mode_masses": target_masses.tolist(),
        "ess": metrics.tilted_ess(rb, cfg.beta),
        "num_base_samples": cfg.target_samples,
        "mean_reward": float((weights * rb.double()).sum()),
        "high_mode_mass": float(target_masses[high].sum()),
        "mode_entropy": metrics.mode_entropy(target_masses, high),
        "base_x": xb, "base_rewards": rb,  # kept in memory for the frontier's tilted family, not written
    }
    pick = torch.multinomial(weights, cfg.eval_samples, replacement=True, generator=gen)
    target_x = xb[pick]  # (eval_samples, 2) resampled: a picture of q
    return base, target, target_masses, target_x, eval_noise, curve_noise, pretrain_s


def run_seed(cfg: Config, seed: int, log=print):
    """Everything for one seed: base, target, the fine-tuned methods, their metrics and samples.

    A method that diverged gets {"diverged": True, "diverged_at": iteration} instead of metrics;
    the other methods still report.
    """
    base, target, target_masses, target_x, eval_noise, curve_noise, pretrain_s = prepare_seed(cfg, seed)
    centers, high = mode_centers(cfg), list(cfg.high_modes)
    log(f"[seed {seed}] base pretrained in {pretrain_s:.1f} s; target: high-mode mass {target['high_mode_mass']:.3f}, "
        f"mode entropy {target['mode_entropy']:.3f}, ESS {target['ess']:.0f} of {cfg.target_samples}")
    per_method, samples, curves = {}, {"target": target_x}, {}
    for method in METHODS:
        if method == "base":
            model, wall, curve, diverged_at = base, 0.0, None, None
        else:
            model, wall, curve, diverged_at = finetune(method, base, cfg, seed, curve_noise, target_masses)
        curves[method] = curve
        if diverged_at is not None:
            per_method[method] = {"diverged": True, "diverged_at": diverged_at}
            log(f"[seed {seed}] {method:<19s} DIVERGED at iteration {diverged_at} (non-finite parameters or samples)")
            continue
        x = ode_samples(model, cfg, eval_noise)
        m = {"diverged": False, **metrics.toy_mode_metrics(x, reward(x, cfg), centers, high, target_masses), "wall_s": wall}
        per_method[method], samples[method] = m, x
        log(f"[seed {seed}] {method:<19s} reward {m['mean_reward']:.3f}  high-mode mass {m['high_mode_mass']:.3f}  covered "
            f"{m['modes_covered']}/{len(high)}  entropy {m['mode_entropy'] + 0.0:.3f}  tilted_tv {m['tilted_tv']:.3f}  ({wall:.1f} s)")
    target = {k: v for k, v in target.items() if k not in ("base_x", "base_rewards")}
    return {"metrics": per_method, "samples": samples, "curves": curves, "target": target, "pretrain_s": pretrain_s}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def summarize(per_seed: list[dict]) -> dict:
    """{metric: value} per seed -> mean and std over the seeds that did not diverge (population std).

    `diverged`: how many seeds diverged; their iterations are in the per-seed entries."""
    ok = [s for s in per_seed if not s["diverged"]]
    out = {"per_seed": per_seed, "diverged": len(per_seed) - len(ok), "mean": {}, "std": {}}
    for key in METRIC_KEYS if ok else ():
        vals = np.array([float(s[key]) for s in ok])
        out["mean"][key] = float(vals.mean())
        out["std"][key] = float(vals.std())
    return out


def format_table(summary: dict, target: dict) -> str:
    """mean ± std over seeds, one row per method, plus the target's own numbers for reference."""
    cols = [("mean_reward", 3), ("high_mode_mass", 3), ("modes_covered", 2), ("mode_entropy", 3),
            ("within_mode_spread", 3), ("lgmd", 2), ("tilted_tv", 3), ("wall_s", 1)]
    head = f"{'method':<20s}" + "".join(f"{c:>20s}" for c, _ in cols) + "   diverged"
    lines = [head, "-" * len(head)]

    def cell(mean, std, d):
        return f"{mean + 0.0:>12.{d}f} ± {std:<5.{d}f}"  # + 0.0 prints -0.0 as 0.0

    for method in METHODS:
        s = summary[method]
        n = len(s["per_seed"])
        where = ", ".join(f"seed {r['seed']} at it {r['diverged_at']}" for r in s["per_seed"] if r["diverged"])
        row = "".join(cell(s["mean"][c], s["std"][c], d) for c, d in cols) if s["mean"] else " " * 20 * len(cols)
        lines.append(f"{method:<20s}" + row + f"   {s['diverged']}/{n}" + (f" ({where})" if where else ""))
    t = {k: (np.mean(v), np.std(v)) for k, v in target.items()}
    lines.append(f"{'target (reweighted)':<20s}" + cell(*t["mean_reward"], 3) + cell(*t["high_mode_mass"], 3) + " " * 20
                 + cell(*t["mode_entropy"], 3))
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_landscape(ax, cfg: Config):
    """The reward as a green background, stars on the high-reward modes; fixed axes, equal aspect."""
    lim = cfg.radius + 1.5
    grid = torch.linspace(-lim, lim, 200)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")  # (200, 200) each
    landscape = reward(torch.stack([gx.flatten(), gy.flatten()], dim=1), cfg).view(200, 200)  # (H, W)
    high = mode_centers(cfg).numpy()[list(cfg.high_modes)]
    ax.contourf(gx.numpy(), gy.numpy(), landscape.numpy(), levels=np.linspace(0, 1.05, 8), cmap="Greens", alpha=0.8)
    ax.scatter(high[:, 0], high[:, 1], marker="*", s=70, c="none", edgecolors="k", linewidths=0.7, zorder=2)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])


def plot_samples(path: str, cfg: Config, samples: dict, titles: dict, sorted_masses: dict, target_sorted: list, seed: int):
    """One panel per method (+ base and target) over the reward landscape, fixed axes, equal aspect;
    the last panel: the masses of the high-reward modes sorted from most to least populated."""
    plt = pyplot()
    high = list(cfg.high_modes)
    fig, axes = plt.subplots(3, 3, figsize=(11, 11.4))
    for ax, name in zip(axes.flat, ["base", "target", *METHODS[1:]]):
        draw_landscape(ax, cfg)
        if name in samples:
            x = samples[name].numpy()
            ax.scatter(x[:, 0], x[:, 1], s=4, c="crimson", alpha=0.2, linewidths=0, zorder=3)  # stacked points turn solid
        ax.set_title(titles[name], fontsize=8.5)
    ax, names = axes.flat[-1], ["target", *[m for m in METHODS if m in sorted_masses]]
    masses = np.array([target_sorted] + [sorted_masses[n] for n in names[1:]])  # (methods, high modes), largest first
    width = 0.8 / len(high)
    for j in range(len(high)):
        ax.bar(np.arange(len(names)) + (j - (len(high) - 1) / 2) * width, masses[:, j], width, label=f"#{j + 1}")
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax.set(ylabel="mass (mean over seeds)", ylim=(0, 1.2))
    ax.set_title("high-reward modes, sorted by mass", fontsize=8.5)
    ax.legend(fontsize=7, ncol=len(high), loc="upper center", title="rank of the mode", title_fontsize=7)
    fig.suptitle(f"seed {seed}: {samples['base'].shape[0]} ODE samples per method from the same noise; green: reward, "
                 f"stars: high-reward modes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(path: str, cfg: Config, curves: dict, target: dict):
    """Leaf reward per iteration; ODE mode entropy and TV to the target every curve_every
    iterations; mean over the seeds that did not diverge, shaded min-max."""
    plt = pyplot()
    fig, (ax_r, ax_h, ax_tv) = plt.subplots(1, 3, figsize=(15, 4))
    for method in METHODS[1:]:
        runs = [c for c in curves[method] if len(c["leaf_reward"]) == cfg.iters]  # the seeds that finished
        if not runs:
            continue
        leaf = np.array([c["leaf_reward"] for c in runs])  # (S, iters)
        its, it_leaf = np.array(runs[0]["curve_iter"]), np.arange(leaf.shape[1])
        line = ax_r.plot(it_leaf, leaf.mean(0), lw=1.0, label=method)[0]
        ax_r.fill_between(it_leaf, leaf.min(0), leaf.max(0), color=line.get_color(), alpha=0.12, linewidth=0)
        for ax, key in ((ax_h, "ode_mode_entropy"), (ax_tv, "ode_tilted_tv")):
            vals = np.array([c[key] for c in runs])  # (S, curve points)
            ax.plot(its, vals.mean(0), lw=1.2, color=line.get_color(), label=method)
            ax.fill_between(its, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.12, linewidth=0)
    ax_r.axhline(np.mean(target["mean_reward"]), color="k", ls="--", lw=0.8, label="target E_q[R]")
    ax_h.axhline(np.mean(target["mode_entropy"]), color="k", ls="--", lw=0.8, label="target")
    ax_r.set(ylabel="mean reward of the rollout leaves")
    ax_h.set(ylabel=f"mode entropy, high modes ({cfg.curve_samples} ODE samples)", ylim=(0, 1.05))
    ax_tv.set(ylabel="TV to the tilted target p_base exp(beta R)", ylim=(0, 1.0))
    for ax in (ax_r, ax_h, ax_tv):
        ax.set(xlabel="iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"mean over {len(curves[METHODS[1]])} seeds (diverged runs left out); shaded: min-max over seeds",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_json(path: str, doc: dict):
    """Strict JSON (allow_nan=False: an LGMD of -inf is written as the string "-inf"), indented, with
    every list of plain numbers on one line (the curves are long)."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # "-inf", "inf", "nan"
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    text = json.dumps(finite(doc), indent=1, allow_nan=False)
    text = re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    json.loads(text)  # still valid JSON, same content
    with open(path, "w") as fh:
        fh.write(text + "\n")


def write_outputs(out: str, cfg: Config, seeds: list, results: list, summary: dict, target: dict, total: float):
    os.makedirs(out, exist_ok=True)
    doc = {
        "config": {**asdict(cfg), "leaves_per_group": cfg.k ** len(cfg.branch_early), "seed_list": seeds},
        "methods": summary,
        "target": {"per_seed": [r["target"] for r in results]},
        "pretrain_s": [r["pretrain_s"] for r in results],
        "curves": {m: [r["curves"][m] for r in results] for m in METHODS[1:]},
        "total_wall_s": total,
    }
    write_json(os.path.join(out, "metrics.json"), doc)

    centers, high = mode_centers(cfg), list(cfg.high_modes)

    def sorted_high(masses):  # (M,) -> masses of the high modes, largest first
        return sorted((float(masses[m]) for m in high), reverse=True)

    sorted_masses = {
        m: np.mean([sorted_high(metrics.mode_masses(r["samples"][m], centers)) for r in results if m in r["samples"]], axis=0)
        for m in METHODS if any(m in r["samples"] for r in results)
    }
    target_sorted = np.mean([sorted_high(r["target"]["mode_masses"]) for r in results], axis=0)
    first = results[0]
    titles = {"target": f"target p_base·exp(βR), β={cfg.beta:g}\n(reweighted base, ESS {first['target']['ess']:.0f})"}
    for m in METHODS:
        v = first["metrics"][m]
        titles[m] = (f"{m}\nDIVERGED at iteration {v['diverged_at']}" if v["diverged"] else
                     f"{m}\nreward {v['mean_reward']:.2f}, covered {v['modes_covered']}/{len(high)}, H {v['mode_entropy'] + 0.0:.2f}")
    plot_samples(os.path.join(out, "samples.png"), cfg, first["samples"], titles, sorted_masses, target_sorted, seeds[0])
    plot_curves(os.path.join(out, "training_curves.png"), cfg, doc["curves"], target)
    print(f"wrote {out}/metrics.json, samples.png, training_curves.png")


def run_seeds(cfg: Config, seeds: list, job, workers: int) -> list:
    """job(cfg, seed) for every seed, in `workers` processes (spawned, one torch thread each).

    Every seed is self-contained (its own generators), so the results do not depend on workers."""
    if workers <= 1 or len(seeds) == 1:
        return [job(cfg, s) for s in seeds]
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(workers, len(seeds)), initializer=torch.set_num_threads,
                                                    initargs=(cfg.threads,)) as pool:
        return pool.starmap(job, [(cfg, s) for s in seeds])


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


SWITCHES = (("--paper-rewards", "every tmpo variant with the released configs' reward processing: R z-scored per group, "
                                "beta 0.8 -> 2.0"),
            ("--no-dual-clip", "Eq. (6) exactly, without the dual clip of the A < 0 branch"))


def parse_args(argv=None, doc: str = __doc__, defaults: Config | None = None, quick: dict = QUICK, extra=SWITCHES):
    """The flags of compare_modes.py and frontier.py: Config overrides, --workers, --quick, --out.

    extra: (flag, help) switches of the script (store_true); returns (Config, parsed namespace)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = defaults or Config()
    for flag, typ, what in (("--seeds", int, "number of seeds"), ("--seed-offset", int, "first seed"),
                            ("--iters", int, "fine-tuning iterations per run"), ("--lr", float, "fine-tuning learning rate")):
        key = flag[2:].replace("-", "_")
        p.add_argument(flag, type=typ, default=None,
                       help=f"{what} (default {getattr(d, key)}" + (f", quick {quick[key]})" if key in quick else ")"))
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes, one seed each at a time (default: min(2, CPUs)); results do not depend on it")
    p.add_argument("--out", default=None, help="write the JSON and PNG figures here (else nothing is written)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    for flag, what in extra:
        p.add_argument(flag, action="store_true", help=what)
    a = p.parse_args(argv)
    cfg = replace(d, **(quick if a.quick else {}))
    cfg = replace(cfg, **{k: getattr(a, k) for k in ("seeds", "seed_offset", "iters", "lr") if getattr(a, k) is not None})
    if getattr(a, "paper_rewards", False):
        cfg = replace(cfg, paper_rewards=True)
    if getattr(a, "no_dual_clip", False):
        cfg = replace(cfg, dual_clip=None)
    cfg.validate()
    if a.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {a.workers}")
    return cfg, a


def main(argv=None):
    cfg, a = parse_args(argv)
    out, workers = a.out, a.workers
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.seeds))
    K = cfg.k ** len(cfg.branch_early)
    spec0 = ts.TreeSpec.tree(cfg.num_steps, cfg.branch_late, cfg.k, eta=cfg.eta)
    nfe, nfe_ref = spec0.rollout_nfe(cfg.groups), spec0.rollout_nfe(cfg.groups, reference=True)
    print(f"2-D toy: {cfg.num_modes} modes, high-reward modes {list(cfg.high_modes)}, " + (
        "TMPO on group z-scored rewards, beta 0.8 -> 2.0 (--paper-rewards)." if cfg.paper_rewards else
        f"beta {cfg.beta} on raw rewards.") + f"\nEach of {len(METHODS) - 1} methods x {len(seeds)} seeds: {cfg.iters} "
          f"iterations of {cfg.groups} groups x {K} leaves = {cfg.groups * K} leaves per rollout ({nfe} velocity evaluations "
          f"at the late tree, + {nfe_ref - nfe} of the base for tmpo_tilted), {cfg.updates_per_rollout} Adam steps per "
          f"rollout (lr {cfg.lr}), clip {cfg.clip_eps}, dual clip {cfg.dual_clip}; {workers} worker process(es).", flush=True)
    results = run_seeds(cfg, seeds, _seed_job, workers)
    for seed, r in zip(seeds, results):
        for m in METHODS:
            r["metrics"][m]["seed"] = seed

    summary = {m: summarize([r["metrics"][m] for r in results]) for m in METHODS}
    target = {k: [r["target"][k] for r in results] for k in ("mean_reward", "high_mode_mass", "mode_entropy", "ess")}
    print()
    print(format_table(summary, target))
    total = time.perf_counter() - t_start
    print(f"\ntotal wall time {total:.1f} s; target ESS {', '.join(f'{e:.0f}' for e in target['ess'])} of {cfg.target_samples}")

    if out:
        write_outputs(out, cfg, seeds, results, summary, target, total)


def _seed_job(cfg: Config, seed: int) -> dict:
    """One seed, as a worker runs it (module level, so that a spawned process can unpickle it)."""
    torch.set_num_threads(cfg.threads)
    return run_seed(cfg, seed, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
