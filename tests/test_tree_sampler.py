"""Tests of tree_sampler.py: reference-equivalence, closed forms, and the tree's bookkeeping."""

import math

import numpy as np
import pytest
import torch

import tmpo
import tree_sampler as ts

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# helpers: a small conditional MLP velocity field
# ----------------------------------------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self, dim=2, cond_dim=3, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1 + cond_dim, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, dim)
        )
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(x.shape[0])
        return self.net(torch.cat([x, t[:, None], cond], dim=1))


def _rollout(model, spec, G=2, seed=0, cond=None):
    cond = torch.randn(G, 3, generator=torch.Generator().manual_seed(99)) if cond is None else cond
    sig = ts.sigma_schedule(spec.num_steps, shift=3.0)
    ro = ts.rollout(model, spec, sig, cond, G, (2,), generator=torch.Generator().manual_seed(seed))
    return ro, cond


# ----------------------------------------------------------------------------------------------
# grid and steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,shift", [(6, 1.0), (28, 3.0), (10, 1.7)])
def test_sigma_schedule_static_shift_equals_diffusers(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    assert torch.allclose(ts.sigma_schedule(n, shift=shift), sch.sigmas, atol=1e-6)


@pytest.mark.parametrize("n,seq", [(6, 1024), (28, 4096), (28, 256)])
def test_sigma_schedule_flux_dynamic_shift_equals_diffusers(n, seq):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sch = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq))
    ours = ts.sigma_schedule(n, image_seq_len=seq)
    assert ours[0] == 1.0 and ours[-1] == 0.0 and bool((ours[1:] < ours[:-1]).all())
    assert torch.allclose(ours, sch.sigmas, atol=1e-6)


def test_ode_step_equals_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    x, v = torch.randn(4, 2), torch.randn(4, 2)
    out = sch.step(v, sch.timesteps[2], x).prev_sample
    assert torch.allclose(ts.ode_step(x, v, sch.sigmas[2], sch.sigmas[3]), out, atol=1e-6)


def test_cps_with_eta_zero_is_euler():
    x, v = torch.randn(5, 3), torch.randn(5, 3)
    for t, t_next in [(1.0, 0.8), (0.6, 0.3), (0.2, 0.0)]:
        mean, s = ts.sde_mean_std(x, v, t, t_next, eta=0.0, kind="cps")
        assert s == 0.0
        assert torch.allclose(mean, ts.ode_step(x, v, t, t_next), atol=1e-6)


def test_cps_std_and_mean_formula():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    t, tn, eta = 0.7, 0.5, 0.7
    mean, s = ts.sde_mean_std(x, v, t, tn, eta, "cps")
    s_ref = tn * math.sin(eta * math.pi / 2)
    mean_ref = (1 - tn) * (x - t * v) + math.sqrt(tn**2 - s_ref**2) * (x + (1 - t) * v)
    assert s == pytest.approx(s_ref)
    assert torch.allclose(mean, mean_ref)


def test_flow_grpo_sde_has_no_division_by_zero_at_t_one():
    x, v = torch.randn(3, 2), torch.randn(3, 2)
    mean, s = ts.sde_mean_std(x, v, 1.0, 0.9, 0.7, "flow_grpo")
    assert torch.isfinite(mean).all() and math.isfinite(s) and s > 0


def test_flow_grpo_sde_preserves_gaussian_marginal():
    # data x0 ~ N(m, s0^2); x_t = (1 - t) x0 + t eps is N((1 - t) m, (1 - t)^2 s0^2 + t^2) and the
    # exact marginal velocity is v = E[eps - x0 | x_t], affine in x. One SDE step of Eq. (40) must map
    # the marginal at t to the marginal at t' (up to the step's O(dt^2) error).
    m, s0, t, tn = 1.5, 0.4, 0.6, 0.57
    V = (1 - t) ** 2 * s0**2 + t**2

    def velocity(x, t=t):
        c = x - (1 - t) * m
        return (t / V) * c - (m + (1 - t) * s0**2 / V * c)

    g = torch.Generator().manual_seed(0)
    x = (1 - t) * m + math.sqrt(V) * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    mean, s = ts.sde_mean_std(x, velocity(x), t, tn, eta=0.9, kind="flow_grpo")
    x_next = mean + s * torch.randn(x.shape, generator=g, dtype=x.dtype)  # Eq. (38)
    assert s > 0.05  # a real amount of injected noise
    mean_ref, var_ref = (1 - tn) * m, (1 - tn) ** 2 * s0**2 + tn**2
    assert abs(x_next.mean().item() - mean_ref) < 5e-3
    assert abs(x_next.var().item() - var_ref) / var_ref < 1e-2


def test_transition_log_prob_matches_torch_normal():
    x_next, mean = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    s = 0.37
    ref = torch.distributions.Normal(mean.double(), s).log_prob(x_next.double()).flatten(1).sum(1)  # Eq. (48)
    assert ts.transition_log_prob(x_next, mean, s, "sum").dtype == torch.float64
    assert torch.allclose(ts.transition_log_prob(x_next, mean, s, "sum"), ref, atol=1e-8)
    assert torch.allclose(ts.transition_log_prob(x_next, mean, s, "mean"), ref / 6, atol=1e-9)  # Eq. (49)
    with pytest.raises(ValueError, match="reduce"):
        ts.transition_log_prob(x_next, mean, s, "avg")
    with pytest.raises(ValueError, match="reduce"):
        ts.rollout(MLP(), ts.TreeSpec(4, roots=1), ts.sigma_schedule(4), torch.zeros(1, 3), 1, (2,), reduce="avg")


# ----------------------------------------------------------------------------------------------
# branch schedule (Eqs. 41-46)
# ----------------------------------------------------------------------------------------------


def test_branch_schedule_always_distinct_and_valid():
    rng = np.random.default_rng(0)
    for p in np.linspace(0, 1, 11):
        for _ in range(200):
            pos = ts.branch_schedule(p, [0, 2, 3], [0, 3, 4], kappa=6, num_steps=6, generator=rng)
            assert len(pos) == 3 and len(set(pos)) == 3 and pos == sorted(pos)
            assert all(0 <= n <= 4 for n in pos)
            assert pos[0] == 0  # the first level is fixed at the roots by the curriculum (mu_bar = 0)
    # the paper's default tree: 27 leaves
    spec = ts.TreeSpec.tree(6, ts.branch_schedule(0.0, [0, 2, 3], [0, 3, 4], 6, 6, rng), k=3)
    assert spec.leaves_per_group == 27


def test_branch_schedule_mean_follows_curriculum():
    rng = np.random.default_rng(1)
    early, late, N, kappa = [2, 8, 14], [5, 11, 16], 20, 20.0
    for p in [0.0, 0.5, 1.0]:
        draws = np.array([ts.branch_schedule(p, early, late, kappa, N, rng) for _ in range(3000)])
        target = np.array(early) + p * (np.array(late) - np.array(early))  # Eq. (41)
        assert np.abs(draws.mean(0) - target).max() < 0.35
    # kappa = inf: deterministic curriculum
    assert ts.branch_schedule(0.5, [0, 2, 3], [0, 4, 4], float("inf"), 6) == [0, 3, 4]


def test_branch_schedule_rejects_unreachable_positions():
    with pytest.raises(ValueError, match="0..4"):
        ts.branch_schedule(0.0, [1, 3, 5], [1, 3, 5], 6, 6)
    with pytest.raises(ValueError, match="do not fit"):
        ts.branch_schedule(0.0, [0, 1, 2, 3], [0, 1, 2, 3], 6, 4)


def test_tree_spec_validation():
    with pytest.raises(ValueError, match="last step"):
        ts.TreeSpec(6, roots=1, fanout={5: 3}, kind="cps")
    with pytest.raises(ValueError, match="eta"):
        ts.TreeSpec(6, roots=1, fanout={2: 3}, eta=0.0)
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    assert spec.roots == 3 and spec.fanout == {2: 3, 3: 3}
    assert spec.active_nodes() == [3, 3, 3, 9, 27, 27]
    assert spec.update_nfe() == 12 and spec.update_nfe(per_leaf=True) == 54


# ----------------------------------------------------------------------------------------------
# rollout bookkeeping
# ----------------------------------------------------------------------------------------------


def test_rollout_forward_count_and_batching():
    model = MLP()
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    ro, _ = _rollout(model, spec, G=2)
    # one batched call per denoising step with every active node of every group
    assert model.calls == [2 * a for a in spec.active_nodes()]
    assert ro.nfe == sum(model.calls) == spec.rollout_nfe(2) == 2 * (3 + 3 + 3 + 9 + 27 + 27)
    assert ro.x0.shape == (2 * 27, 2)
    assert ro.log_prob.shape == (2, 27)
    assert [tr.step for tr in ro.transitions] == [2, 3]


def test_rollout_without_branch_points_is_plain_euler():
    model = MLP()
    sig = ts.sigma_schedule(8, shift=2.0)
    cond = torch.randn(4, 3)
    x_root = torch.randn(4, 2)
    ro = ts.rollout(model, ts.TreeSpec(8, roots=1), sig, cond, 4, (2,), x_root=x_root)
    x = x_root.clone()
    with torch.no_grad():
        for n in range(8):
            x = x + (sig[n + 1] - sig[n]) * model(x, torch.full((4,), float(sig[n])), cond)
    assert torch.allclose(ro.x0, x, atol=1e-6)
    assert ro.transitions == [] and torch.equal(ro.log_prob, torch.zeros(4, 1, dtype=torch.float64))


def test_tree_log_prob_is_sum_over_path_and_prefix_is_shared():
    model = MLP()
    spec = ts.TreeSpec(6, roots=2, fanout={1: 2, 3: 3}, eta=0.7)
    ro, _ = _rollout(model, spec, G=1)
    K = spec.leaves_per_group
    assert K == 12
    a, b = ro.transitions
    # leaves under the same parent share the whole prefix: same parent state at the first SDE step
    parent_of_leaf = a.leaf_child // a.k
    assert torch.equal(parent_of_leaf, torch.arange(2).repeat_interleave(6))
    # log P(leaf) = sum of the per-transition log-probs along its path (Eq. 47), recomputed by hand
    d = 2
    for i in range(K):
        ca, cb = int(a.leaf_child[i]), int(b.leaf_child[i])
        lp = ts.transition_log_prob(a.x_next[ca : ca + 1], a.mean[ca // a.k : ca // a.k + 1], a.std)
        lp = lp + ts.transition_log_prob(b.x_next[cb : cb + 1], b.mean[cb // b.k : cb // b.k + 1], b.std)
        assert torch.allclose(ro.traj_log_prob("sum")[0, i], lp[0], atol=1e-3)
        assert torch.allclose(ro.traj_log_prob("mean")[0, i], lp[0] / d, atol=1e-3)
        # the child of b is a child of a's child: the tree is consistent
        assert torch.equal(b.x[cb // b.k], a.x_next[ca]) or b.step > a.step + 1


def test_independent_sampler_is_flow_grpo_setting():
    model = MLP()
    spec = ts.TreeSpec.independent(6, K=5, sde_steps=range(0, 5), kind="flow_grpo")
    ro, _ = _rollout(model, spec, G=2)
    assert spec.leaves_per_group == 5 and len(ro.transitions) == 5
    assert ro.nfe == 2 * 5 * 6
    for tr in ro.transitions:
        assert tr.k == 1 and torch.equal(tr.leaf_child, torch.arange(10))


# ----------------------------------------------------------------------------------------------
# the update
# ----------------------------------------------------------------------------------------------


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_importance_ratio_is_exactly_one_before_the_first_update():
    model = MLP()
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    ro, cond = _rollout(model, spec, G=2)
    with torch.no_grad():
        log_rho, nfe = ts.trajectory_log_ratio(model, ro, cond, reduce="sum")
    assert nfe == spec.update_nfe(2) == 24
    assert torch.equal(log_rho.exp(), torch.ones(54))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_tree_gradient_equals_per_leaf_gradient_and_chunked(reduce):
    model = MLP()
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    ro, cond = _rollout(model, spec, G=2, seed=3)
    # move the policy away from the rollout policy so that rho != 1 and clipping matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    A = torch.randn(2, 27, generator=torch.Generator().manual_seed(5))
    grads, stats = {}, {}
    for name, kw in {
        "tree": dict(),
        "per_leaf": dict(unshared=True),
        "chunked": dict(chunk_size=2),
        "chunked_per_leaf": dict(chunk_size=7, unshared=True),
    }.items():
        model.zero_grad()
        model.calls.clear()
        rollout = ro.unshared() if kw.pop("unshared", False) else ro
        stats[name] = ts.update(model, rollout, cond, A, clip_eps=0.2, reduce=reduce, **kw)
        grads[name] = _grads(model)
    assert stats["tree"]["nfe_grad"] == 24 and stats["per_leaf"]["nfe_grad"] == 2 * 54
    assert stats["chunked"]["nfe_nograd"] == 24  # rho at the current parameters, no graph
    if reduce == "sum":
        assert stats["tree"]["clipfrac"] > 0  # the clip is active for some leaves
    for name in ["per_leaf", "chunked", "chunked_per_leaf"]:
        assert torch.allclose(grads[name], grads["tree"], rtol=1e-4, atol=1e-6), name
        assert stats[name]["loss"] == pytest.approx(stats["tree"]["loss"], rel=1e-5, abs=1e-7)
    assert grads["tree"].abs().sum() > 0


def test_on_policy_chunked_update_equals_plain_update_without_extra_forwards():
    model = MLP()
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    ro, cond = _rollout(model, spec, G=1, seed=4)
    A = tmpo.softmax_tb_advantage(ro.log_prob, torch.randn(1, 27), beta=1.0)
    model.zero_grad()
    plain = ts.update(model, ro, cond, A)
    g_plain = _grads(model)
    model.zero_grad()
    chunked = ts.update(model, ro, cond, A, chunk_size=4, on_policy=True)
    assert chunked["nfe_nograd"] == 0 and chunked["nfe_grad"] == 12 and chunked["chunks"] == 1 + 3
    assert torch.allclose(_grads(model), g_plain, rtol=1e-5, atol=1e-7)
    assert plain["log_ratio_mean"] == 0.0 and plain["clipfrac"] == 0.0


def test_kl_penalty_gradient_chunked_equals_plain_and_vanishes_at_reference():
    model = MLP()
    ref = MLP()  # same seed -> identical weights: the reference = the policy before training
    spec = ts.TreeSpec.independent(6, K=4, sde_steps=[0, 1, 2, 3, 4])
    ro, cond = _rollout(model, spec, G=2, seed=2)
    A = torch.zeros(2, 4)
    model.zero_grad()
    out = ts.update(model, ro, cond, A, kl_coef=1.0, ref_velocity_fn=ref)
    assert out["kl"] == 0.0 and _grads(model).abs().max() == 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.zero_grad()
    plain = ts.update(model, ro, cond, A, kl_coef=0.5, ref_velocity_fn=ref, reduce="sum")
    g_plain = _grads(model)
    model.zero_grad()
    chunked = ts.update(model, ro, cond, A, kl_coef=0.5, ref_velocity_fn=ref, reduce="sum", chunk_size=3)
    assert plain["kl"] > 0 and chunked["kl"] == pytest.approx(plain["kl"], rel=1e-5)
    assert torch.allclose(_grads(model), g_plain, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="ref_velocity_fn"):
        ts.update(model, ro, cond, A, kl_coef=0.5)


def test_update_rejects_wrong_advantage_shape():
    model = MLP()
    ro, cond = _rollout(model, ts.TreeSpec.tree(6, [0, 2], k=2), G=1)
    with pytest.raises(ValueError, match="leaves"):
        ts.update(model, ro, cond, torch.zeros(1, 3))


def test_trajectory_log_ratio_equals_eq7_over_the_leaf_paths():
    # Eq. (7) two ways: the sampler's one-forward-per-parent recompute, and tmpo.ratio_norm_log_ratio
    # on every child transition (mean of its parent) summed along Rollout.paths().
    model = MLP()
    spec = ts.TreeSpec(6, roots=2, fanout={1: 3, 3: 2})
    ro, cond = _rollout(model, spec, G=2, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        log_rho, _ = ts.trajectory_log_ratio(model, ro, cond, reduce="sum")
        means, old, nxt, std = [], [], [], []
        for tr in ro.transitions:
            t = torch.full((tr.x.shape[0],), tr.t)
            v = model(tr.x, t, cond[tr.group])
            mean, s = ts.sde_mean_std(tr.x, v, tr.t, tr.t_next, spec.eta, spec.kind)
            means.append(mean.repeat_interleave(tr.k, 0))
            old.append(tr.mean.repeat_interleave(tr.k, 0))
            nxt.append(tr.x_next)
            std.append(torch.full((tr.x_next.shape[0],), s))
        ref = tmpo.ratio_norm_log_ratio(torch.cat(means), torch.cat(old), torch.cat(nxt), torch.cat(std),
                                        reduce="sum", paths=ro.paths())
    assert ro.paths().shape == (2 * 12, 2)
    assert torch.allclose(log_rho, ref, atol=1e-5)
    assert log_rho.abs().max() > 1e-3  # the policy really moved


# ----------------------------------------------------------------------------------------------
# the reference process (reward-tilted target)
# ----------------------------------------------------------------------------------------------


def test_reference_log_probs_cost_one_forward_per_parent_and_score_the_recorded_children():
    model, ref = MLP(seed=0), MLP(seed=1)
    spec = ts.TreeSpec.tree(6, [0, 3, 4], k=3)  # the default FLUX tree: 3 roots, SDE at steps 3 and 4
    cond = torch.randn(2, 3, generator=torch.Generator().manual_seed(99))
    sig = ts.sigma_schedule(6, shift=3.0)
    plain = ts.rollout(model, spec, sig, cond, 2, (2,), generator=torch.Generator().manual_seed(0), reduce="sum")
    model.calls.clear()
    ro = ts.rollout(model, spec, sig, cond, 2, (2,), generator=torch.Generator().manual_seed(0), reduce="sum",
                    ref_velocity_fn=ref)
    # the reference costs 3 + 9 = 12 forwards per group, in one batched call per SDE step
    assert ref.calls == [2 * 3, 2 * 9] and ro.nfe == plain.nfe + 2 * 12 == spec.rollout_nfe(2, reference=True)
    assert torch.equal(ro.x0, plain.x0) and torch.equal(ro.log_prob, plain.log_prob)  # sampling unchanged
    # log P_ref: every recorded child scored under the reference's mean, summed along each leaf's path
    expected = torch.zeros(2 * 27, dtype=torch.float64)
    for tr in ro.transitions:
        with torch.no_grad():
            v = ref(tr.x, torch.full((tr.x.shape[0],), tr.t), cond[tr.group])
        mean, s = ts.sde_mean_std(tr.x, v, tr.t, tr.t_next, spec.eta, spec.kind)
        lp = torch.distributions.Normal(mean.double().repeat_interleave(3, 0), s).log_prob(tr.x_next.double()).sum(-1)
        expected += lp[tr.leaf_child]
    assert torch.allclose(ro.ref_log_prob.reshape(-1), expected, rtol=1e-9, atol=1e-6)
    assert not torch.allclose(ro.ref_log_prob, ro.log_prob)
    # the policy as its own reference: log P_ref = log P exactly
    same = ts.rollout(model, spec, sig, cond, 2, (2,), generator=torch.Generator().manual_seed(0), ref_velocity_fn=model)
    assert torch.equal(same.ref_log_prob, same.log_prob)
    with pytest.raises(ValueError, match="ref_velocity_fn"):
        plain.ref_log_prob


def test_unshared_rollout_has_the_same_paths_at_the_per_leaf_cost():
    model = MLP()
    spec = ts.TreeSpec.tree(6, [0, 2, 3], k=3)
    ro, cond = _rollout(model, spec, G=2)
    flat = ro.unshared()
    assert torch.equal(flat.log_prob, ro.log_prob) and torch.equal(flat.x0, ro.x0)
    assert all(tr.k == 1 and tr.x.shape[0] == 54 for tr in flat.transitions)
    with torch.no_grad():
        log_rho, nfe = ts.trajectory_log_ratio(model, flat, cond, reduce="sum")
    assert nfe == spec.update_nfe(2, per_leaf=True) == 2 * 54 and torch.allclose(log_rho, torch.zeros(54), atol=1e-6)
