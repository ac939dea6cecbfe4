"""One command for the first machine with a GPU: the tests marked `gpu`, then the iteration-cost
benchmark at FLUX.1-dev width; one JSON and a printed summary. No downloads: every model is random
and built offline. Under 8 minutes on one H100/H200 (not yet run: no GPU was available so far).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check                 # CUDA
    python benchmarks/gpu_check.py --out /tmp/gpu_check --device cpu --quick          # the plumbing, CPU, < 3 min

  1. `pytest -m gpu tests` (tests/test_gpu.py) with TMPO_TEST_DEVICE=<device>: rollout and recompute
     in bf16 at FLUX.1-dev width and the importance ratio before the first update (exactly 1 when
     parents are batched as in the rollout; the measured max |log rho| for reduce sum and mean when
     the batch shapes differ); offloaded text encoders; train.py 3 steps with FSDP2 on one GPU and
     with DDP, equal LoRAs; eval.py on the result. What the tests measure comes back through
     pytest's record_property in a JUnit XML.
  2. benchmarks/iteration_cost.py --device <device> (large preset on CUDA, tiny with --quick):
     seconds per iteration of the TMPO tree, per-leaf recompute, no tree and Flow-GRPO, ratios to
     Flow-GRPO, and the peak memory of rollout and update (max_memory_allocated on CUDA) at
     K = 9, 27, 81 with and without gradient checkpointing, next to flux.memory_plan's numbers.
Writes DIR/gpu_check.json (plus DIR/gpu_tests.xml and DIR/iteration_cost.json). Exit status 1 when
a test failed or was skipped on the GPU, or the benchmark failed. Commit the JSON under
benchmarks/results/ once it has run on a GPU.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list, env: dict, timeout: int) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True,
                              text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    return {"command": " ".join(cmd), "returncode": code, "seconds": time.perf_counter() - start,
            "output_tail": out[-4000:] if isinstance(out, str) else out.decode(errors="replace")[-4000:]}


def run_tests(device: str, out_dir: str, timeout: int) -> dict:
    """`pytest -m gpu` on `device`; each test's status, seconds and recorded properties."""
    xml = os.path.join(out_dir, "gpu_tests.xml")
    run = _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o",
                "junit_family=xunit1", f"--junitxml={xml}", "tests"], {"TMPO_TEST_DEVICE": device}, timeout)
    run["tests"] = []
    if os.path.isfile(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            status = "failed" if problem is not None else "skipped" if case.find("skipped") is not None else "passed"
            run["tests"].append({
                "name": case.get("name"), "status": status, "seconds": float(case.get("time") or 0),
                "properties": {p.get("name"): json.loads(p.get("value")) for p in case.iter("property")},
                "message": None if problem is None else (problem.get("message") or "")[:2000]})
    return run


def run_benchmark(device: str, quick: bool, out_dir: str, timeout: int) -> dict:
    out = os.path.join(out_dir, "iteration_cost.json")
    if os.path.exists(out):
        os.remove(out)  # never report a previous run's numbers
    run = _run([sys.executable, os.path.join("benchmarks", "iteration_cost.py"), "--device", device, "--out", out]
               + (["--quick"] if quick else []), {}, timeout)
    run["result"] = None
    if run["returncode"] == 0:
        with open(out) as fh:
            run["result"] = json.load(fh)
    return run


def summary(report: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"gpu_check on {report['device_name']} ({report['device']}{', quick' if report['quick'] else ''}): "
             f"{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s"]
    for t in report["tests"]["tests"]:
        lines.append(f"  {t['status']:7s} {t['name']} ({t['seconds']:.0f} s)"
                     + "".join(f"\n            {k}: {v}" for k, v in t["properties"].items())
                     + (f"\n            {t['message'][:300]}" if t["message"] else ""))
    if not report["tests"]["tests"]:
        lines.append("  no test ran: " + report["tests"]["output_tail"][-1500:])
    result = report["benchmark"]["result"]
    if result is None:
        return "\n".join(lines + ["  iteration_cost.py failed: " + report["benchmark"]["output_tail"][-1500:]])
    lines.append(f"  iteration_cost '{result['config']['preset']}', K = {result['config']['K']}: s/iter (vs Flow-GRPO)")
    lines += [f"    {name:14s} {m['median_s']['iteration']:8.3f}  ({m['ratio_vs_flow_grpo']:.2f})"
              for name, m in result["methods"].items()]
    lines.append("  peak MiB, measured | plan (CUDA: max_memory_allocated; CPU: saved tensors)")
    cuda = result["env"]["device"].startswith("cuda")
    for row in result["memory"]:
        ro, cells = row["rollout"], []
        for v in ("chunked", "chunked_checkpointed", "plain", "plain_checkpointed"):
            u = row[v]
            measured, plan = (u["cuda_peak_bytes"], u["plan_peak_bytes"]) if cuda else (u["saved_peak_bytes"], u["plan_saved_bytes"])
            cells.append(f"{v} {mib(measured)} | {mib(plan)}")
        lines.append(f"    K = {row['K']:2d}: rollout {mib(ro['cuda_peak_bytes'])} | {mib(ro['plan_bytes'])}; " + "; ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json (created)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the plumbing)")
    parser.add_argument("--quick", action="store_true", help="the benchmark's tiny preset (with --device cpu: < 3 min)")
    args = parser.parse_args(argv)
    import torch  # after argparse: --help needs no torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False: use --device cpu --quick for the plumbing")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    report = {"device": args.device, "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu",
              "tests": run_tests(args.device, args.out, timeout=360),
              "benchmark": run_benchmark(args.device, args.quick, args.out, timeout=360)}
    statuses = [t["status"] for t in report["tests"]["tests"]]
    report["passed"] = bool(statuses) and all(s == "passed" for s in statuses) and report["benchmark"]["result"] is not None
    report["seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "gpu_check.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print(summary(report))
    print(f"wrote {os.path.join(args.out, 'gpu_check.json')}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
