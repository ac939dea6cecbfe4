"""Tests of benchmarks/iteration_cost.py: run it as a user would (--quick) and check what it writes.

The forward counts are re-derived here by hand from the tree's shape (not from TreeSpec); the
memory table must show the chunked update bounded while the plain one grows with K, gradient
checkpointing saving less, and the saved tensors equal to flux.activation_bytes' count (the
memory plan's activations) times the rows alive; the LoRA-off reference is checked against the
model. flux.SavedTensorMeter itself is tested in tests/test_flux.py.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "iteration_cost.py")
METHODS = ["tmpo", "tmpo_chunked", "tmpo_per_leaf", "no_tree", "flow_grpo"]


def _load_module():
    spec = importlib.util.spec_from_file_location("iteration_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["iteration_cost"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cost.json"
    # KL on for Flow-GRPO, so that its reference forwards (without grad) are counted as well.
    cmd = [sys.executable, SCRIPT, "--quick", "--threads", "1", "--kl-coef", "0.04", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_quick_run_writes_complete_json(quick_run):
    result, stdout = quick_run
    assert {"env", "config", "methods", "memory", "activation_bytes_per_row", "grad_check", "paper_s", "wall_s"} <= set(result)
    assert result["env"]["torch"] == torch.__version__ and result["env"]["device"] == "cpu"
    assert result["env"]["threads"] == 1
    assert result["config"]["preset"] == "tiny" and result["config"]["K"] == 27
    assert list(result["methods"]) == METHODS
    assert result["paper_s"] == {"tmpo": 68.3, "flow_grpo": 108.9, "tree_grpo": 79.1, "no_tree": 123.7}
    reps = result["config"]["reps"]
    assert reps == 2
    for name, m in result["methods"].items():
        for key in ("iteration", "rollout", "update"):
            times = m["times_s"][key]
            assert len(times) == reps and all(t > 0 for t in times), name
            assert m["median_s"][key] == pytest.approx(statistics.median(times))
        ref = result["methods"]["flow_grpo"]["median_s"]["iteration"]
        assert m["ratio_vs_flow_grpo"] == pytest.approx(m["median_s"]["iteration"] / ref) and m["ratio_vs_flow_grpo"] > 0
    assert result["methods"]["flow_grpo"]["ratio_vs_flow_grpo"] == 1.0
    assert "vs Flow-GRPO" in stdout and "saved | plan" in stdout


def test_forward_counts_are_the_floor(quick_run):
    m = {name: r["nfe"] for name, r in quick_run[0]["methods"].items()}
    K, N = 27, 6
    # Tree [0, 2, 3], k = 3: 3 roots for steps 0-2, 9 nodes after the branch at step 2, 27 after step 3.
    tree_rollout = 3 + 3 + 3 + 9 + 27 + 27
    for name in ("tmpo", "tmpo_chunked", "tmpo_per_leaf"):
        assert m[name]["rollout"] == tree_rollout == 72
        assert m[name]["rollout_calls"] == N  # one batched call per denoising step
    assert m["tmpo"]["update_grad"] == m["tmpo_chunked"]["update_grad"] == 3 + 9  # unique parents
    assert m["tmpo_per_leaf"]["update_grad"] == K * 2 == 54  # every leaf's two SDE transitions
    assert m["tmpo"]["update_nograd"] == m["tmpo_chunked"]["update_nograd"] == m["tmpo_per_leaf"]["update_nograd"] == 0
    assert m["tmpo"]["backward_calls"] == 1
    for name in ("no_tree", "flow_grpo"):
        assert m[name]["rollout"] == K * N == 162 and m[name]["rollout_calls"] == N
    assert m["no_tree"]["update_grad"] == K * 2
    assert m["flow_grpo"]["update_grad"] == K * 5 == 135  # a forward with grad per leaf per SDE step 0..4
    assert m["flow_grpo"]["update_nograd"] == K * 5  # the KL reference (LoRA off), one per recomputed step
    # the script's counter, the sampler's own counts and TreeSpec's formulas agree (checked in the script too)
    for name, r in quick_run[0]["methods"].items():
        for key in ("rollout", "update_grad", "update_nograd"):
            assert r["nfe"][key] == r["nfe_formula"][key], (name, key)


VARIANTS = ("plain", "chunked", "plain_checkpointed", "chunked_checkpointed")


def test_chunked_update_memory_is_bounded_and_plain_grows(quick_run):
    rows = {r["K"]: r for r in quick_run[0]["memory"]}
    assert sorted(rows) == [9, 27, 81]
    for suffix in ("", "_checkpointed"):
        plain = {K: rows[K]["plain" + suffix]["saved_peak_bytes"] for K in rows}
        chunked = {K: rows[K]["chunked" + suffix]["saved_peak_bytes"] for K in rows}
        assert plain[9] < plain[27] < plain[81]
        assert chunked[81] < plain[81] / 3  # 9 forwards alive instead of 39
        assert chunked[81] <= 1.05 * chunked[27]  # bounded by the chunk size, not by K
    for K in rows:
        alive = {9: (3, 3), 27: (3 + 9, 9), 81: (3 + 9 + 27, 9)}[K]  # plain: every parent; chunked: <= 9
        assert [rows[K][v]["grad_forwards_alive"] for v in VARIANTS] == [*alive, *alive]
        for v in VARIANTS:
            assert rows[K][v]["saved_live_after_bytes"] == 0  # the graph was freed by backward
            assert rows[K][v]["cuda_peak_bytes"] is None  # CPU run
        # checkpointing keeps the blocks' inputs instead of their activations
        assert rows[K]["plain_checkpointed"]["saved_peak_bytes"] < rows[K]["plain"]["saved_peak_bytes"] / 2
        # the rollout keeps x, mean and children of each SDE step, and the leaves: at least 2 K rows of (S, C) fp32
        assert rows[K]["rollout"]["stored_bytes"] >= 2 * K * 16 * 64 * 4
    assert rows[9]["rollout"]["stored_bytes"] < rows[27]["rollout"]["stored_bytes"] < rows[81]["rollout"]["stored_bytes"]


def test_saved_activations_are_the_plans_count(quick_run):
    """What the update saves = rows alive x flux.activation_bytes (meta count) + the sampler's fp64
    residuals, within 1%: the plan's activation numbers are the update's."""
    result = quick_run[0]
    act = result["activation_bytes_per_row"]
    assert act["checkpointed"] < act["block"] < act["grad"]
    for row in result["memory"]:
        for v in VARIANTS:
            u = row[v]
            assert u["saved_peak_bytes"] == pytest.approx(u["plan_saved_bytes"], rel=0.01), (row["K"], v)


def test_gradient_check_passed(quick_run):
    check = quick_run[0]["grad_check"]
    assert check["passed"] and check["max_abs_grad_plain"] > 0
    assert set(check["rel_max_diff_vs_plain"]) == {"chunked_on_policy", "chunked_off_policy", "per_leaf", "per_leaf_chunked"}
    assert all(v <= check["tol"] == 1e-4 for v in check["rel_max_diff_vs_plain"].values())


def test_reference_velocity_is_the_model_without_lora():
    bench = _load_module()
    model = bench.build_model("tiny", groups=1, seed=0, device=torch.device("cpu"))
    x = torch.randn(2, *model.event_shape)
    t = torch.full((2,), 0.7)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in model.cond.items()}
    with torch.no_grad():
        v0, r0 = model.velocity_fn(x, t, cond), model.ref_velocity_fn(x, t, cond)
        assert torch.equal(v0, r0)  # LoRA's B starts at 0: the policy starts at the base model
        for p in model.lora:
            p.add_(0.5 * torch.randn_like(p))
        v1, r1 = model.velocity_fn(x, t, cond), model.ref_velocity_fn(x, t, cond)
        v2 = model.velocity_fn(x, t, cond)
    assert not torch.allclose(v1, v0)  # the LoRA moved the policy ...
    assert torch.equal(r1, r0)  # ... but not the reference
    assert torch.equal(v2, v1)  # and the adapter is switched back on after a reference call
