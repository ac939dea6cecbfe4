"""Tests of benchmarks/iteration_cost.py: run it as a user would (--quick) and check what it writes.

The forward counts are re-derived here by hand from the tree's shape (not from TreeSpec), the
memory table must show the chunked update bounded while the plain one grows with K, and the
script's own instruments (saved-tensor meter, image ids, LoRA-off reference) are checked against
closed forms and diffusers.
"""

import importlib.util
import json
import math
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
    assert {"env", "config", "methods", "memory", "grad_check", "paper_s", "wall_s"} <= set(result)
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
            assert math.isfinite(m["ratio_vs_flow_grpo"][key]) and m["ratio_vs_flow_grpo"][key] > 0
            ref = result["methods"]["flow_grpo"]["median_s"][key]
            assert m["ratio_vs_flow_grpo"][key] == pytest.approx(m["median_s"][key] / ref)
    assert result["methods"]["flow_grpo"]["ratio_vs_flow_grpo"]["iteration"] == 1.0
    assert "vs Flow-GRPO" in stdout and "Update peak memory" in stdout


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


def test_chunked_update_memory_is_bounded_and_plain_grows(quick_run):
    rows = {r["K"]: r for r in quick_run[0]["memory"]}
    assert sorted(rows) == [9, 27, 81]
    plain = {K: rows[K]["plain"]["saved_peak_bytes"] for K in rows}
    chunked = {K: rows[K]["chunked"]["saved_peak_bytes"] for K in rows}
    assert plain[9] < plain[27] < plain[81]
    assert chunked[81] < plain[81] / 3  # 9 forwards alive instead of 39
    assert chunked[81] <= 1.05 * chunked[27]  # bounded by the chunk size, not by K
    assert [rows[K]["plain"]["grad_forwards_alive"] for K in (9, 27, 81)] == [3, 3 + 9, 3 + 9 + 27]
    assert [rows[K]["chunked"]["grad_forwards_alive"] for K in (9, 27, 81)] == [3, 9, 9]
    for K in rows:
        for variant in ("plain", "chunked"):
            assert rows[K][variant]["saved_live_after_bytes"] == 0  # the graph was freed by backward


def test_gradient_check_passed(quick_run):
    check = quick_run[0]["grad_check"]
    assert check["passed"] and check["max_abs_grad_plain"] > 0
    assert set(check["rel_max_diff_vs_plain"]) == {"chunked_on_policy", "chunked_off_policy", "per_leaf", "per_leaf_chunked"}
    assert all(v <= check["tol"] == 1e-4 for v in check["rel_max_diff_vs_plain"].values())


def test_saved_tensor_meter_closed_form():
    bench = _load_module()
    a = torch.randn(1000, requires_grad=True)  # 4000 bytes
    with bench.SavedTensorMeter() as meter:
        b = a.exp()  # exp saves its result: 4000 bytes
        c = b.exp()  # another 4000
        assert meter.live == 8000
        c.sum().backward()
    assert meter.peak == 8000 and meter.live == 0
    with bench.SavedTensorMeter() as meter:
        (a * a).sum().backward()  # mul saves both operands, the same storage: counted once
    assert meter.peak == 4000 and meter.live == 0
    with bench.SavedTensorMeter(exclude=[a]) as meter:  # a parameter is not activation memory
        (a * a).sum().backward()
    assert meter.peak == 0


def test_reference_velocity_is_the_model_without_lora():
    bench = _load_module()
    args = bench.Args(config="tiny")
    model = bench.build_model(bench.MODEL_CONFIGS["tiny"], args, torch.device("cpu"))
    x = torch.randn(2, *model.event_shape)
    t = torch.full((2,), 0.7)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in model.cond.items()}
    with torch.no_grad():
        v0, r0 = model.velocity_fn(x, t, cond), model.ref_velocity_fn(x, t, cond)
        assert torch.equal(v0, r0)  # LoRA's B starts at 0: the policy starts at the base model
        for p in model.lora_params:
            p.add_(0.5 * torch.randn_like(p))
        v1, r1 = model.velocity_fn(x, t, cond), model.ref_velocity_fn(x, t, cond)
        v2 = model.velocity_fn(x, t, cond)
    assert not torch.allclose(v1, v0)  # the LoRA moved the policy ...
    assert torch.equal(r1, r0)  # ... but not the reference
    assert torch.equal(v2, v1)  # and the adapter is switched back on after a reference call
