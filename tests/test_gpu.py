"""Checks that need a GPU, marked `gpu`: skipped without CUDA (tests/conftest.py).

benchmarks/gpu_check.py runs them (`pytest -m gpu`) and collects what they measure (pytest's
record_property, values JSON-encoded) into its JSON. With TMPO_TEST_DEVICE=cpu the same code runs
on CPU (`gpu_check.py --device cpu --quick`, tests/test_gpu_check.py), so the plumbing works before
a GPU is seen; the CUDA-specific parts (bf16 kernels, cuBLAS batch shapes, FSDP2 on a GPU,
max_memory_allocated) have NOT been run yet: no GPU was available to the session that wrote them.

    python -m pytest -q -m gpu tests          # on a GPU machine
"""

import importlib.util
import json
import os
import sys

import pytest
import torch

import flux
import tree_sampler as ts
from test_fsdp import ROOT, _load, _start, _wait
from tiny_flux import tiny_flux_dir  # noqa: F401  (session fixture)
from tiny_rewards import build_tiny_pickscore

pytestmark = pytest.mark.gpu


def _bench():
    spec = importlib.util.spec_from_file_location("iteration_cost", os.path.join(ROOT, "benchmarks", "iteration_cost.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["iteration_cost"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_importance_ratio_before_the_first_update(test_device, record_property):
    """Rollout and recompute in bf16 at FLUX.1-dev width (the benchmark's large preset; tiny fp32 on
    CPU): before any update rho = 1 exactly when the recompute batches parents as the rollout did;
    with other batch shapes (one parent per call) and under grad, the measured max |log rho|."""
    model = _bench().build_model("large" if test_device.type == "cuda" else "tiny", 1, 0, test_device)
    spec = ts.TreeSpec.tree(6, (0, 2, 3), k=3)
    for reduce in ("sum", "mean"):
        ro = ts.rollout(model.velocity_fn, spec, model.sigmas, model.cond, 1, model.event_shape, reduce=reduce,
                        generator=torch.Generator(device=test_device).manual_seed(0), device=test_device)
        with torch.no_grad():
            same, _ = ts.trajectory_log_ratio(model.velocity_fn, ro, model.cond, reduce)
            single, _ = ts.trajectory_log_ratio(model.velocity_fn, ro, model.cond, reduce, chunk_size=1)
        grad, _ = ts.trajectory_log_ratio(model.velocity_fn, ro, model.cond, reduce)  # the plain update's recompute
        record_property(f"max_abs_log_rho_{reduce}_one_parent_per_call", json.dumps(float(single.abs().max())))
        record_property(f"max_abs_log_rho_{reduce}_under_grad", json.dumps(float(grad.detach().abs().max())))
        assert torch.equal(same, torch.zeros_like(same)), f"reduce {reduce}: same batch shapes, rho != 1"
        assert torch.isfinite(single).all() and torch.isfinite(grad).all()


def test_offloaded_text_encoders_visit_the_device_only_to_encode(test_device, tiny_flux_dir, record_property):  # noqa: F811
    pipe = flux.load_flux(tiny_flux_dir, dtype=torch.bfloat16, device=test_device, offload_text_encoders=True)
    cuda = test_device.type == "cuda"
    before = torch.cuda.memory_allocated(test_device) if cuda else 0
    cond, _ = flux.encode_prompts(pipe, ["a photo of a cat"], 16, device=test_device)
    assert cond["prompt_embeds"].device.type == test_device.type and pipe.transformer.device.type == test_device.type
    assert pipe.text_encoder.device.type == pipe.text_encoder_2.device.type == "cpu"
    if cuda:  # nothing but the embeddings stays allocated
        kept = torch.cuda.memory_allocated(test_device) - before
        record_property("bytes_kept_after_encode", json.dumps(kept))
        assert kept <= 2 * sum(t.numel() * t.element_size() for t in cond.values()) + 2**20


def test_train_fsdp2_and_ddp_three_steps_in_bf16_then_eval(test_device, tmp_path, tiny_flux_dir, record_property):  # noqa: F811
    """train.py, 3 steps, one process: FSDP2 (accelerate_configs/fsdp_8gpu.yaml) and DDP
    (ddp_8gpu.yaml), bf16 on CUDA (fp32 on CPU); equal LoRAs; then eval.py on the FSDP run's EMA."""
    cuda = test_device.type == "cuda"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red cube on a blue cube\n")
    pickscore = build_tiny_pickscore(tmp_path / "pickscore")
    flags = ["--model", tiny_flux_dir, "--reward-path", f"pickscore={pickscore}", "--prompts", str(prompts),
             "--height", "32", "--width", "32", "--max-sequence-length", "16", "--lora-rank", "8", "--lora-alpha", "16",
             "--dtype", "bf16" if cuda else "fp32", "--branch-k", "2", "--max-steps", "3", "--save-every", "3"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "bf16" if cuda else "no", "--dynamo_backend", "no", "--config_file"]
    configs = {name: os.path.join(ROOT, "accelerate_configs", f"{name}_8gpu.yaml") for name in ("fsdp", "ddp")}
    runs = {"fsdp": [*launch, configs["fsdp"], *([] if cuda else [os.path.join(ROOT, "tests", "fsdp_on_cpu.py")])],
            "ddp": [*launch, configs["ddp"]]}
    env = None if cuda else {"ACCELERATE_USE_CPU": "true"}
    procs = {name: _start(cmd, [*flags, "--output-dir", str(tmp_path / name)], env=env) for name, cmd in runs.items()}
    logs = {name: _wait(p) for name, p in procs.items()}
    record_property("memory_plan_fsdp", json.dumps([line for line in logs["fsdp"].splitlines() if "memory" in line
                                                    or "max(encode" in line]))
    ckpt = {name: tmp_path / name / "checkpoint-3" for name in runs}
    assert torch.load(ckpt["fsdp"] / "trainer_state.pt", weights_only=False)["optimizer"] is None  # FSDP ran (sharded)
    a, b = _load(ckpt["fsdp"] / "lora"), _load(ckpt["ddp"] / "lora")
    rel = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a if "lora_B" in k)
    record_property("lora_fsdp_vs_ddp_rel_max_diff", json.dumps(rel))
    assert rel <= (5e-2 if cuda else 2**-8)  # CUDA: FSDP's bf16 gradients vs DDP's fp32 ones under autocast

    out = tmp_path / "eval"
    proc = _start([sys.executable], ["--model", tiny_flux_dir, "--prompts", str(prompts), "--out", str(out),
                                     "--height", "32", "--width", "32", "--steps", "4", "--images-per-prompt", "2",
                                     "--max-sequence-length", "16", "--metrics", "pickscore", "lgmd",
                                     "--metric-path", f"pickscore={pickscore}", "--lora", f"tmpo={ckpt['fsdp'] / 'ema'}"],
                  script="eval.py")
    _wait(proc)
    results = json.loads((out / "results.json").read_text())
    record_property("eval_results_keys", json.dumps(sorted(results)))
    assert "tmpo" in json.dumps(results) and "base" in json.dumps(results)
