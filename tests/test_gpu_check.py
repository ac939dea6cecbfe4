"""benchmarks/gpu_check.py --device cpu --quick: the GPU check's plumbing, run on CPU as a user would.

The `gpu` tests run on the CPU (TMPO_TEST_DEVICE=cpu), their recorded measurements reach the JSON,
and the benchmark's timings and memory table are in it, so the script is known to work before it
meets a GPU (where it has not run yet).

    python -m pytest -q tests/test_gpu_check.py
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_plumbing_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--out", str(tmp_path),
                           "--device", "cpu", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and report["seconds"] < 180
    tests = {t["name"]: t for t in report["tests"]["tests"]}
    assert set(tests) == {"test_importance_ratio_before_the_first_update",
                          "test_offloaded_text_encoders_visit_the_device_only_to_encode",
                          "test_train_fsdp2_and_ddp_three_steps_in_bf16_then_eval"}
    assert all(t["status"] == "passed" for t in tests.values())  # run on CPU, not skipped
    ratio = tests["test_importance_ratio_before_the_first_update"]["properties"]
    assert {f"max_abs_log_rho_{r}_{how}" for r in ("sum", "mean") for how in ("one_parent_per_call", "under_grad")} == set(ratio)
    assert all(0 <= v < 1e-3 for v in ratio.values())
    assert tests["test_train_fsdp2_and_ddp_three_steps_in_bf16_then_eval"]["properties"]["lora_fsdp_vs_ddp_rel_max_diff"] <= 2**-8
    result = report["benchmark"]["result"]
    assert result["config"]["preset"] == "tiny" and set(result["methods"]) >= {"tmpo", "tmpo_per_leaf", "no_tree", "flow_grpo"}
    assert [row["K"] for row in result["memory"]] == [9, 27, 81]
    assert "PASSED" in proc.stdout and "s/iter (vs Flow-GRPO)" in proc.stdout and "K = 81" in proc.stdout
