"""Dynamic Stochastic Tree Sampling: the sigma grid, ODE/SDE steps, log-probs and the tree rollout.

Paper: Li et al. 2026, Sec. 4.2 and App. C (Eqs. 2-3, 8-9, 38-49 of EQUATIONS.md).

A group of K = roots * k^L trajectories of one prompt is sampled as a tree. Denoising runs on a
decreasing grid sigma_0 = 1 > ... > sigma_N = 0 (step n goes sigma_n -> sigma_{n+1}). At a few
scheduled branch steps a node draws k children from a Gaussian transition (CPS, Eq. 9, or
Flow-GRPO's SDE, Eqs. 39-40); every other step is a deterministic Euler (ODE) step. The prefix
before a branch is computed once and shared by all its descendants, every denoising step runs all
active nodes of all groups through ONE batched velocity call, and the whole rollout runs without
grad. Only the stochastic transitions have a log-probability (Eq. 47), so the update recomputes
only those, once per unique parent (not once per leaf), with grad.

Model-agnostic: anything with `velocity_fn(x, t, cond) -> v` works (a 2-D MLP in toy/, FLUX in
flux.py). The same `rollout` with independent roots and k = 1 SDE steps is Flow-GRPO's sampler,
so the baselines differ from TMPO only where the paper says they differ.

Branch-position convention (Eqs. 41-46). Positions are 0-based denoising-step indices on the
N-step grid. Position 0 means "branch before the first step": the k children are k independent
initial noises (drawing from the prior does not depend on theta, so it adds no log-prob term).
Position n >= 1 makes the transition of step n an SDE step with k children; n <= N - 2, because the
CPS noise t' sin(eta pi / 2) is 0 on the last step (t' = 0). The released configs write early
[1, 2, 3] / late [1, 3, 5] on 6 steps, promote a first position <= 1 to independent roots and clamp
to N - 2 = 4; the same trees are early [0, 2, 3] / late [0, 3, 4] here (27 leaves: 3 roots, two SDE
branch levels). Unlike the released code, `branch_schedule` always returns L distinct positions.

    python -m pytest -q tests/test_tree_sampler.py
    python toy/compare_modes.py --quick
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from tmpo import DUAL_CLIP, clipped_surrogate_loss, gaussian_kl, ratio_norm_log_ratio, surrogate_log_ratio_weights

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]



# ----------------------------------------------------------------------------------------------
# The sigma grid
# ----------------------------------------------------------------------------------------------


def sigma_schedule(
    num_steps: int,
    shift: float = 1.0,
    image_seq_len: Optional[int] = None,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> torch.Tensor:
    """Flow-matching time grid sigma_0 = 1 > ... > sigma_N = 0, shape (num_steps + 1,), float32.

    The unshifted grid is FluxPipeline's linspace(1, 1/N, N) (not the scheduler's own default, which
    ends at 1/1000). With `image_seq_len` it applies FLUX's resolution-dependent shift: mu grows
    linearly in the number of image tokens and sigma' = e^mu / (e^mu + 1/sigma - 1). Without it, the
    static shift sigma' = shift sigma / (1 + (shift - 1) sigma). Both equal diffusers'
    FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...) (tested), final 0 appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if image_seq_len is not None:
        m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
        mu = image_seq_len * m + (base_shift - m * base_seq_len)
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])  # (N + 1,)


# ----------------------------------------------------------------------------------------------
# One step: ODE (Euler) and SDE (CPS / Flow-GRPO), and the Gaussian transition log-prob
# ----------------------------------------------------------------------------------------------


def ode_step(x: torch.Tensor, v: torch.Tensor, t, t_next) -> torch.Tensor:
    """Euler step of dx = v dt (Eq. 3 with a = 0): x' = x + (t' - t) v."""
    return x + (t_next - t) * v


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, eta: float, kind: str = "cps"):
    """Mean mu and std s of the Gaussian transition x' ~ N(mu, s^2 I) of one SDE step.

    kind="cps" (coefficients-preserving sampling, Eq. 9; the released configs, eta = 0.7):
        x0_hat = x - t v, x1_hat = x + (1 - t) v, s = t' sin(eta pi / 2),
        mu = (1 - t') x0_hat + sqrt(t'^2 - s^2) x1_hat.   eta = 0 is the Euler step exactly.
    kind="flow_grpo" (Eqs. 39-40, marginal-preserving SDE of Eq. 3 discretised):
        sigma_n = eta sqrt(t / (1 - t)), s = sigma_n sqrt(-dt),
        mu = x + [v + sigma_n^2 / (2t) (x + (1 - t) v)] dt.
        At t = 1 the ratio t / (1 - t) is infinite; as Flow-GRPO does, 1 - t is replaced there by
        1 - t' (the next grid point), so no division by zero happens.
    Returns (mu with x's shape, s as a python float); s does not depend on theta.
    """
    t, t_next = float(t), float(t_next)
    if kind == "cps":
        s = t_next * math.sin(eta * math.pi / 2)  # Eq. (9)
        x0_hat = x - t * v  # predicted data
        x1_hat = x + (1.0 - t) * v  # predicted noise
        mean = (1.0 - t_next) * x0_hat + math.sqrt(max(t_next**2 - s**2, 0.0)) * x1_hat  # Eq. (9)
        return mean, s
    if kind == "flow_grpo":
        dt = t_next - t  # < 0
        one_minus_t = (1.0 - t) if t < 1.0 else (1.0 - t_next)  # Flow-GRPO's guard at t = 1
        sigma_n = eta * math.sqrt(t / one_minus_t)  # Eq. (39)
        mean = x + (v + sigma_n**2 / (2 * t) * (x + (1.0 - t) * v)) * dt  # Eq. (40)
        return mean, sigma_n * math.sqrt(-dt)  # Eq. (39)
    raise ValueError(f"unknown SDE kind {kind!r}: use 'cps' (Eq. 9) or 'flow_grpo' (Eqs. 39-40)")


def transition_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std, reduce: str = "sum") -> torch.Tensor:
    """log N(x'; mu, s^2 I) per row, (N,) (Eq. 48), or its per-dimension mean (Eq. 49).

    Eq. (48): -||x' - mu||^2 / (2 s^2) - D log s - (D / 2) log(2 pi). Float64 in and out: under
    "sum" the value is O(D) (D = 65536 for FLUX at 512^2) and its differences matter.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' (Eq. 48) or 'mean' (Eq. 49), got {reduce!r}")
    d = x_next[0].numel()
    sq = (x_next.double() - mean.double()).pow(2).flatten(1).sum(dim=1)  # (N,)
    s = float(std)
    logp = -sq / (2 * s * s) - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)  # Eq. (48)
    return logp if reduce == "sum" else logp / d  # Eq. (48) or Eq. (49), float64 (N,)


# ----------------------------------------------------------------------------------------------
# Where to branch: the curriculum-guided Beta schedule (Eqs. 41-46)
# ----------------------------------------------------------------------------------------------


def branch_schedule(
    progress: float,
    early: Sequence[int],
    late: Sequence[int],
    kappa: float,
    num_steps: int,
    generator: Optional[np.random.Generator] = None,
) -> list[int]:
    """L distinct branch positions for training progress p in [0, 1] (Eqs. 41-46).

    early, late: the curriculum's positions at p = 0 and p = 1 (0-based; 0 = independent roots).
    kappa: Beta concentration; float('inf') gives the deterministic curriculum (no perturbation,
        the "w/o dynamic branching" ablation uses early == late).
    generator: a numpy Generator (torch has no seeded Beta sampler). All ranks of a distributed run
        must pass identically seeded generators: the tree shape must agree across ranks.
    Valid positions are 0..N-2 (see the module docstring). Rounding can make two positions equal;
    the released code then returns fewer than L levels (fewer than k^L leaves). Here duplicates are
    pushed apart (up, then down from N - 2), so the result is always L distinct valid positions.
    """
    if len(early) != len(late) or len(early) == 0:
        raise ValueError(f"early {list(early)} and late {list(late)} must be non-empty and of equal length")
    n_min, n_max = 0, num_steps - 2
    L = len(early)
    if L > n_max - n_min + 1:
        raise ValueError(f"{L} branch levels do not fit in positions {n_min}..{n_max} of a {num_steps}-step grid")
    for name, pos in (("early", early), ("late", late)):
        bad = [n for n in pos if not n_min <= n <= n_max]
        if bad:
            raise ValueError(
                f"branch positions {name}={list(pos)} must lie in {n_min}..{n_max} on a {num_steps}-step grid "
                f"(0 = independent roots; the last step has no CPS noise). Released [1,3,5] on 6 steps is [0,3,4] here."
            )
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    rng = generator if generator is not None else np.random.default_rng()
    positions = []
    for n_early, n_late in zip(early, late):
        mu = n_early + progress * (n_late - n_early)  # Eq. (41)
        mu_bar = (mu - n_min) / (n_max - n_min) if n_max > n_min else 0.0  # Eq. (42)
        if math.isinf(kappa) or mu_bar <= 0.0 or mu_bar >= 1.0:
            # Beta(kappa mu_bar, kappa (1 - mu_bar)) tends to a point mass at mu_bar as kappa -> inf
            # and at 0 / 1 when a shape parameter tends to 0; use that limit instead of an invalid law.
            xi = mu_bar
        else:
            xi = rng.beta(kappa * mu_bar, kappa * (1.0 - mu_bar))  # Eq. (43); mean mu_bar (44), var (45)
        positions.append(int(round(n_min + xi * (n_max - n_min))))  # Eq. (46)
    positions.sort()
    for b in range(1, L):  # push duplicates up ...
        positions[b] = max(positions[b], positions[b - 1] + 1)
    positions[-1] = min(positions[-1], n_max)
    for b in range(L - 2, -1, -1):  # ... and back down below n_max: always L distinct positions
        positions[b] = min(positions[b], positions[b + 1] - 1)
    return positions


# ----------------------------------------------------------------------------------------------
# The shape of one group's tree
# ----------------------------------------------------------------------------------------------


@dataclass
class TreeSpec:
    """What one rollout samples per group.

    roots: independent initial noises per group (a branch at position 0).
    fanout: {step n: children per node} for the SDE steps; 1 = an SDE step without branching
        (Flow-GRPO's independent trajectories), k > 1 = a branch point.
    eta, kind: the SDE's noise level and type (see `sde_mean_std`).
    """

    num_steps: int
    roots: int
    fanout: dict[int, int] = field(default_factory=dict)
    eta: float = 0.7
    kind: str = "cps"

    def __post_init__(self):
        self.fanout = {int(n): int(c) for n, c in sorted(self.fanout.items())}
        if self.roots < 1:
            raise ValueError(f"roots must be >= 1, got {self.roots}")
        if self.kind not in ("cps", "flow_grpo"):
            raise ValueError(f"unknown SDE kind {self.kind!r}: use 'cps' or 'flow_grpo'")
        last = self.num_steps - 2 if self.kind == "cps" else self.num_steps - 1
        for n, c in self.fanout.items():
            if c < 1:
                raise ValueError(f"fanout at step {n} must be >= 1, got {c}")
            if not 0 <= n <= last:
                raise ValueError(
                    f"SDE step {n} is outside 0..{last} for kind={self.kind!r} on {self.num_steps} steps "
                    "(CPS has no noise on the last step)"
                )
        if self.fanout and self.eta <= 0:
            raise ValueError(f"SDE steps need eta > 0 (eta = 0 has zero noise and no log-prob), got {self.eta}")

    @classmethod
    def tree(cls, num_steps: int, branch_steps: Sequence[int], k: int, eta: float = 0.7, kind: str = "cps") -> "TreeSpec":
        """TMPO's tree: k children at every branch position; position 0 = k independent roots."""
        steps = sorted(int(n) for n in branch_steps)
        if len(set(steps)) != len(steps):
            raise ValueError(f"branch positions must be distinct, got {list(branch_steps)}")
        if steps and steps[0] == 0:
            return cls(num_steps, roots=k, fanout={n: k for n in steps[1:]}, eta=eta, kind=kind)
        return cls(num_steps, roots=1, fanout={n: k for n in steps}, eta=eta, kind=kind)

    @classmethod
    def independent(cls, num_steps: int, K: int, sde_steps: Sequence[int], eta: float = 0.7, kind: str = "cps") -> "TreeSpec":
        """Flow-GRPO's sampler: K independent trajectories, an SDE (k = 1) step at each of sde_steps."""
        return cls(num_steps, roots=K, fanout={int(n): 1 for n in sde_steps}, eta=eta, kind=kind)

    @property
    def leaves_per_group(self) -> int:
        return self.roots * math.prod(self.fanout.values())

    def active_nodes(self) -> list[int]:
        """Nodes per group that the velocity model sees at each denoising step, (N,)."""
        active, counts = self.roots, []
        for n in range(self.num_steps):
            counts.append(active)
            active *= self.fanout.get(n, 1)
        return counts

    def rollout_nfe(self, num_groups: int = 1, reference: bool = False) -> int:
        """Velocity evaluations of one rollout: sum over steps of the active nodes (+ with a reference
        model, one more per parent of each SDE step)."""
        active = self.active_nodes()
        return num_groups * (sum(active) + (sum(active[n] for n in self.fanout) if reference else 0))

    def update_nfe(self, num_groups: int = 1, per_leaf: bool = False) -> int:
        """Forwards with grad of one update: one per unique parent of each SDE step (or per leaf path)."""
        active = self.active_nodes()
        per_group = sum(self.leaves_per_group if per_leaf else active[n] for n in self.fanout)
        return num_groups * per_group


# ----------------------------------------------------------------------------------------------
# The rollout
# ----------------------------------------------------------------------------------------------


def _index_cond(cond: Any, idx: torch.Tensor) -> Any:
    """Rows `idx` of every tensor in a (possibly nested) condition: each node gets its group's row."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, idx.to(cond.device))
    if isinstance(cond, dict):
        return {k: _index_cond(v, idx) for k, v in cond.items()}
    if isinstance(cond, (tuple, list)):
        return type(cond)(_index_cond(v, idx) for v in cond)
    return cond  # python scalars and other constants are shared by every row


def _velocity(velocity_fn: VelocityFn, x, t: float, cond, group, max_batch: Optional[int]) -> torch.Tensor:
    """velocity_fn on all rows of x at time t, in slices of at most max_batch rows."""
    n = x.shape[0]
    step = n if max_batch is None else max_batch
    out = []
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        t_rows = torch.full((rows.stop - rows.start,), float(t), device=x.device, dtype=torch.float32)
        v = velocity_fn(x[rows], t_rows, _index_cond(cond, group[rows]))
        out.append(v.to(x.dtype))
    return out[0] if len(out) == 1 else torch.cat(out)


@dataclass
class Transition:
    """One SDE step of the rollout, recorded once for all its nodes (Eq. 47 sums these).

    P = number of parents (active nodes, all groups), k = children per parent.
    """

    step: int  # denoising step index n
    t: float  # sigma_n
    t_next: float  # sigma_{n+1}
    std: float  # s, the transition noise scale (independent of theta)
    k: int  # children per parent
    x: torch.Tensor  # (P, *event) parent states x_n
    group: torch.Tensor  # (P,) group (prompt) of each parent, to index cond
    mean: torch.Tensor  # (P, *event) mu_old(x_n) under the rollout policy
    x_next: torch.Tensor  # (P*k, *event) children x_{n+1}; child c of parent p is row p*k + c
    log_prob: torch.Tensor  # (P*k,) float64 log N(x_next; mu_old, s^2) under reduce="sum" (Eq. 48)
    leaf_child: torch.Tensor  # (G*K,) row of x_next that each leaf descends from
    ref_log_prob: Optional[torch.Tensor] = None  # (P*k,) float64 log N(x_next; mu_ref, s^2), with a reference


@dataclass
class Rollout:
    """A batch of G groups of K trajectories; leaves are group-major (reshape(G, K, ...))."""

    spec: TreeSpec
    sigmas: torch.Tensor  # (N + 1,)
    x0: torch.Tensor  # (G*K, *event) the final samples
    transitions: list[Transition]
    num_groups: int
    nfe: int  # velocity evaluations (node-steps) spent, the reference's included
    reduce: str = "mean"

    @property
    def leaves_per_group(self) -> int:
        return self.spec.leaves_per_group

    def traj_log_prob(self, reduce: Optional[str] = None, reference: bool = False) -> torch.Tensor:
        """log P(tau_i) = sum over the leaf's stochastic transitions (Eq. 47), (G, K), float64.

        reference=True: the same recorded transitions scored under the reference model's means,
        log P_ref(tau_i) (needs `rollout(..., ref_velocity_fn=...)`).
        """
        reduce = reduce or self.reduce
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' (Eq. 48) or 'mean' (Eq. 49), got {reduce!r}")
        if reference and any(tr.ref_log_prob is None for tr in self.transitions):
            raise ValueError("this rollout has no reference log-probs: pass ref_velocity_fn to rollout()")
        total = torch.zeros(self.x0.shape[0], dtype=torch.float64, device=self.x0.device)
        d = self.x0[0].numel()
        for tr in self.transitions:
            lp = (tr.ref_log_prob if reference else tr.log_prob).double()[tr.leaf_child]  # (G*K,)
            total += lp / d if reduce == "mean" else lp  # Eq. (49) or (48)
        return total.view(self.num_groups, -1)

    @property
    def log_prob(self) -> torch.Tensor:
        return self.traj_log_prob(self.reduce)

    @property
    def ref_log_prob(self) -> torch.Tensor:
        return self.traj_log_prob(self.reduce, reference=True)

    def paths(self) -> torch.Tensor:
        """(G*K, L) index of each leaf's transition in the concatenation of all records' children."""
        cols, off = [], 0
        for tr in self.transitions:
            cols.append(tr.leaf_child + off)
            off += tr.x_next.shape[0]
        return torch.stack(cols, dim=1) if cols else torch.zeros(self.x0.shape[0], 0, dtype=torch.long)

    def unshared(self) -> "Rollout":
        """The same trajectories with every leaf's path stored on its own (k = 1, one parent per leaf).

        An update on it recomputes each leaf's path separately: what a sampler without prefix
        sharing pays (benchmarks/iteration_cost.py). Same leaves, log-probs and gradient.
        """
        transitions = []
        for tr in self.transitions:
            parent = tr.leaf_child // tr.k  # (G*K,) parent row of each leaf
            transitions.append(dataclasses.replace(
                tr, k=1, x=tr.x[parent], group=tr.group[parent], mean=tr.mean[parent],
                x_next=tr.x_next[tr.leaf_child], log_prob=tr.log_prob[tr.leaf_child],
                ref_log_prob=None if tr.ref_log_prob is None else tr.ref_log_prob[tr.leaf_child],
                leaf_child=torch.arange(parent.shape[0], device=parent.device),
            ))
        return dataclasses.replace(self, transitions=transitions)


@torch.no_grad()
def rollout(
    velocity_fn: VelocityFn,
    spec: TreeSpec,
    sigmas: torch.Tensor,
    cond: Any,
    num_groups: int,
    event_shape: Sequence[int],
    generator: Optional[torch.Generator] = None,
    x_root: Optional[torch.Tensor] = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    max_batch: Optional[int] = None,
    reduce: str = "mean",
    ref_velocity_fn: Optional[VelocityFn] = None,
) -> Rollout:
    """Sample G groups of `spec.leaves_per_group` trajectories as prefix-sharing trees (Sec. 4.2).

    Every denoising step runs all active nodes of all groups through one velocity call (sliced by
    max_batch only to bound memory). Deterministic steps are Euler steps (Eq. 3 with a = 0); at an
    SDE step each node's mean is computed once and its k children are mean + s * eps (Eq. 38).
    Nothing here needs grad: the update recomputes the stochastic transitions (see `update`).
    ref_velocity_fn: the reference model (the base) for the reward-tilted target. At every SDE step
    it runs once more on the same parents, and the recorded children are scored under its mean:
    log P_ref of every leaf (Rollout.ref_log_prob) for one extra forward per unique parent of the
    SDE steps (3 + 9 = 12 per group for the default tree), counted in `nfe`.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' (Eq. 48) or 'mean' (Eq. 49), got {reduce!r}")
    if len(sigmas) != spec.num_steps + 1:
        raise ValueError(f"sigmas has {len(sigmas)} entries, the spec needs num_steps + 1 = {spec.num_steps + 1}")
    G = num_groups
    if x_root is None:
        x = torch.randn((G * spec.roots, *event_shape), generator=generator, device=device, dtype=dtype)
    else:
        if x_root.shape != (G * spec.roots, *event_shape):
            raise ValueError(f"x_root must have shape {(G * spec.roots, *event_shape)}, got {tuple(x_root.shape)}")
        x = x_root.to(device=device or x_root.device, dtype=dtype)
    group = torch.arange(G, device=x.device).repeat_interleave(spec.roots)  # (G*roots,), group-major
    records: list[Transition] = []
    # leaf_child of each record, tracked for the *current* active nodes and expanded at each branch
    node_child: list[torch.Tensor] = []
    nfe = 0
    sig = [float(s) for s in sigmas]
    for n in range(spec.num_steps):
        t, t_next = sig[n], sig[n + 1]
        v = _velocity(velocity_fn, x, t, cond, group, max_batch)  # one batched call: all active nodes
        nfe += x.shape[0]
        k = spec.fanout.get(n)
        if k is None:
            x = ode_step(x, v, t, t_next)  # deterministic step, shared by every descendant
            continue
        mean, s = sde_mean_std(x, v, t, t_next, spec.eta, spec.kind)  # (P, *event), once per parent
        mean_children = mean.repeat_interleave(k, dim=0)  # (P*k, *event): child c of p at p*k + c
        noise = torch.randn(mean_children.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean_children + s * noise  # Eq. (38)
        ref_log_prob = None
        if ref_velocity_fn is not None:  # the same parents under the reference: log P_ref of the children
            ref_mean, _ = sde_mean_std(x, _velocity(ref_velocity_fn, x, t, cond, group, max_batch), t, t_next,
                                       spec.eta, spec.kind)  # (P, *event)
            nfe += x.shape[0]
            ref_log_prob = transition_log_prob(x_next, ref_mean.repeat_interleave(k, dim=0), s)  # Eq. (48), (P*k,)
        node_child = [c.repeat_interleave(k) for c in node_child]
        node_child.append(torch.arange(x_next.shape[0], device=x.device))
        records.append(
            Transition(
                step=n, t=t, t_next=t_next, std=s, k=k, x=x, group=group, mean=mean, x_next=x_next,
                log_prob=transition_log_prob(x_next, mean_children, s, reduce="sum"),  # Eq. (48)
                leaf_child=node_child[-1],  # completed below, once the leaves are known
                ref_log_prob=ref_log_prob,
            )
        )
        x, group = x_next, group.repeat_interleave(k)
    for tr, leaf_child in zip(records, node_child):
        tr.leaf_child = leaf_child  # (G*K,)
    return Rollout(spec=spec, sigmas=sigmas, x0=x, transitions=records, num_groups=G, nfe=nfe, reduce=reduce)


# ----------------------------------------------------------------------------------------------
# Recomputing the stochastic transitions for the update
# ----------------------------------------------------------------------------------------------


def _recompute_mean(velocity_fn: VelocityFn, tr: Transition, spec: TreeSpec, cond, parent_rows: torch.Tensor):
    """mu_theta(x_n) for the given parent rows, under the caller's grad mode, (U, *event).

    Uses exactly the (t, t', eta, kind) recorded at rollout: before the first update the recomputed
    mean equals the rollout's and the importance ratio is 1 (bit-exact when the recompute batches
    the parents as the rollout did, chunk_size=None; otherwise up to floating-point rounding of the
    different batch shape, ~1e-6 in fp32, more in bf16).
    """
    x = tr.x[parent_rows]
    t = torch.full((x.shape[0],), tr.t, device=x.device, dtype=torch.float32)
    v = velocity_fn(x, t, _index_cond(cond, tr.group[parent_rows])).to(x.dtype)
    mean, _ = sde_mean_std(x, v, tr.t, tr.t_next, spec.eta, spec.kind)
    return mean


def _recompute(velocity_fn, ro: Rollout, cond, reduce, ratio_norm, chunk_size):
    """Recompute every SDE step's means, chunk_size parents at a time, under the caller's grad mode.

    One forward per unique parent: its k children share it. Yields, per chunk of parents [a, b) of
    record j: (j, record, parent rows (u,), mean (u, *event), children slice [a k, b k),
    log r~ of those children (u k,)).
    """
    for j, tr in enumerate(ro.transitions):
        num_parents = tr.x.shape[0]
        for a in range(0, num_parents, chunk_size or num_parents):
            b = min(a + (chunk_size or num_parents), num_parents)
            parents = torch.arange(a, b, device=tr.x.device)  # (u,)
            mean = _recompute_mean(velocity_fn, tr, ro.spec, cond, parents)  # (u, *event)
            children = slice(a * tr.k, b * tr.k)
            log_r = ratio_norm_log_ratio(  # Eqs. (31)-(32), one per child (u k,)
                mean.repeat_interleave(tr.k, dim=0), tr.mean[a:b].repeat_interleave(tr.k, dim=0),
                tr.x_next[children], tr.std, reduce=reduce, ratio_norm=ratio_norm,
            )
            yield j, tr, parents, mean, children, log_r


def _gather_log_rho(ro: Rollout, step_log_r: list[torch.Tensor]) -> torch.Tensor:
    """Eq. (7): log rho_i = sum over leaf i's stochastic transitions, (G*K,)."""
    log_rho = torch.zeros(ro.x0.shape[0], device=ro.x0.device)
    for tr, log_r in zip(ro.transitions, step_log_r):
        log_rho = log_rho + log_r[tr.leaf_child]  # (P*k,) -> (G*K,)
    return log_rho


def trajectory_log_ratio(
    velocity_fn: VelocityFn,
    ro: Rollout,
    cond: Any,
    reduce: str = "mean",
    ratio_norm: bool = True,
    chunk_size: Optional[int] = None,
):
    """log rho_i (Eq. 7) of every leaf at the current parameters, (G*K,), and the forwards spent.

    Runs under the caller's grad mode: one forward per unique parent of every SDE step.
    """
    pieces: list[list[torch.Tensor]] = [[] for _ in ro.transitions]
    nfe = 0
    for j, _, parents, _, _, log_r in _recompute(velocity_fn, ro, cond, reduce, ratio_norm, chunk_size):
        pieces[j].append(log_r)
        nfe += parents.shape[0]
    return _gather_log_rho(ro, [torch.cat(p) for p in pieces]), nfe


def update(
    velocity_fn: VelocityFn,
    ro: Rollout,
    cond: Any,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: Optional[float] = DUAL_CLIP,
    reduce: str = "mean",
    ratio_norm: bool = True,
    chunk_size: Optional[int] = None,
    on_policy: bool = False,
    kl_coef: float = 0.0,
    ref_velocity_fn: Optional[VelocityFn] = None,
    backward: Optional[Callable[[torch.Tensor], None]] = None,
) -> dict:
    """Back-propagate the clipped loss of Eq. (6) (+ kl_coef * KL to a reference) into the params.

    advantages: (G, K), detached (Eq. 5 or Eq. 28). The caller zeroes grads and steps the optimizer.
    dual_clip: c of tmpo.clipped_ratio (the cap on rho of a leaf with A < 0; None = Eq. 6 exactly).
    chunk_size=None: the plain update: log rho of every leaf in one graph, the loss, one backward.
    chunk_size=c: the same gradient with at most c forwards with grad alive at once. The loss
        couples a leaf to every transition on its path, but its gradient is
        sum_j W_j grad log r~_j with W_j = sum_{leaves i through j} dL/dlog rho_i
        (tmpo.surrogate_log_ratio_weights), so transitions are back-propagated c parents at a
        time. W needs rho at the current parameters: one forward without grad per parent first,
        skipped when on_policy=True (parameters unchanged since the rollout, so rho = 1 by
        definition; clipfrac and approx_kl of that update are then 0 by construction).
    kl_coef, ref_velocity_fn: the GRPO baselines' KL to a reference model (Flow-GRPO's penalty),
        summed along each leaf's path and averaged over leaves; reference forwards run without grad.
    backward: how to back-propagate a loss (e.g. accelerator.backward); default loss.backward().
    Returns floats: loss, clipfrac, approx_kl, log_ratio_mean (all at the pre-update parameters),
    kl, nfe_grad (forwards with grad), nfe_nograd (the other forwards), chunks (backward calls).
    """
    backward = backward or (lambda loss: loss.backward())
    A = advantages.reshape(-1).to(ro.x0.device).float()  # (G*K,), group-major like the leaves
    num_leaves = A.shape[0]
    if num_leaves != ro.x0.shape[0]:
        raise ValueError(f"advantages have {num_leaves} entries, the rollout has {ro.x0.shape[0]} leaves")
    if kl_coef > 0 and ref_velocity_fn is None:
        raise ValueError("kl_coef > 0 needs ref_velocity_fn (the reference model's velocity)")
    chunked = chunk_size is not None
    nfe_grad = nfe_nograd = chunks = 0
    kl_total = torch.zeros((), device=ro.x0.device)

    if chunked:  # W_j of every transition j, from rho at the current parameters
        if on_policy:
            log_rho = torch.zeros(num_leaves, device=ro.x0.device)  # theta == theta_old: rho = 1
        else:
            with torch.no_grad():
                log_rho, nfe_nograd = trajectory_log_ratio(velocity_fn, ro, cond, reduce, ratio_norm, chunk_size)
        w = surrogate_log_ratio_weights(log_rho, A, clip_eps, dual_clip)  # (G*K,) dL / dlog rho_i
        W = [torch.zeros(tr.x_next.shape[0], device=w.device).index_add_(0, tr.leaf_child, w)  # (P*k,)
             for tr in ro.transitions]

    pieces: list[list[torch.Tensor]] = [[] for _ in ro.transitions]
    for j, tr, parents, mean, children, log_r in _recompute(velocity_fn, ro, cond, reduce, ratio_norm, chunk_size):
        nfe_grad += parents.shape[0]
        kl_chunk = torch.zeros((), device=ro.x0.device)
        if kl_coef > 0:
            with torch.no_grad():
                ref_mean = _recompute_mean(ref_velocity_fn, tr, ro.spec, cond, parents)
            nfe_nograd += parents.shape[0]
            # each parent's KL counts once per leaf below it: the average over leaves of their paths
            leaves_below = torch.bincount(tr.leaf_child // tr.k, minlength=tr.x.shape[0])[parents].float()  # (u,)
            kl_chunk = (leaves_below * gaussian_kl(mean, ref_mean, tr.std, reduce)).sum() / num_leaves
        if chunked:
            # d/dtheta of this surrogate is sum_j W_j grad log r~_j over the chunk's transitions
            backward((W[j][children] * log_r).sum() + kl_coef * kl_chunk)
            chunks += 1
            kl_total = kl_total + kl_chunk.detach()
        else:
            pieces[j].append(log_r)
            kl_total = kl_total + kl_chunk

    if not chunked:
        log_rho = _gather_log_rho(ro, [torch.cat(p) for p in pieces])  # Eq. (7), with grad
        backward(clipped_surrogate_loss(log_rho, A, clip_eps, dual_clip) + kl_coef * kl_total)  # Eq. (6)
        chunks = 1
        log_rho = log_rho.detach()

    rho = log_rho.exp()
    loss = clipped_surrogate_loss(log_rho, A, clip_eps, dual_clip) + kl_coef * kl_total.detach()
    return {
        "loss": float(loss),
        "clipfrac": float(((rho - 1).abs() > clip_eps).float().mean()),
        "approx_kl": float(0.5 * log_rho.pow(2).mean()),
        "log_ratio_mean": float(log_rho.mean()),
        "kl": float(kl_total.detach()),
        "nfe_grad": nfe_grad,
        "nfe_nograd": nfe_nograd,
        "chunks": chunks,
    }
