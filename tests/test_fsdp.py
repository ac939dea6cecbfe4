"""train.py on accelerate's FSDP2 path, on two CPU processes (gloo), against the DDP run.

accelerate_configs/fsdp_8gpu.yaml (FSDP2, fully_shard per FLUX block) launched with 2 processes
through tests/fsdp_on_cpu.py (accelerate would turn FSDP into DDP on CPU; that file says where and
how it is kept), a bf16 base and the fp32 LoRA, gradient checkpointing on (the GPU default), on the
tiny random FLUX and PickScore:
  - 2 steps under FSDP equal 2 steps under DDP within bf16 precision (gradients were reduced);
  - resumed from the FSDP run's checkpoint-1 (--resume latest), a run ends bit-identical to the
    uninterrupted one: LoRA, EMA and each rank's optimizer shard;
  - the exported LoRA loads with FluxPipeline.load_lora_weights.

    python -m pytest -q tests/test_fsdp.py
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_flux import tiny_flux_dir  # noqa: E402, F401  (session fixture)
from tiny_rewards import build_tiny_pickscore  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CPU = {"ACCELERATE_USE_CPU": "true"}  # accelerate launch: gloo processes on the CPU
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
FSDP = [*LAUNCH, "--config_file", os.path.join(ROOT, "accelerate_configs", "fsdp_8gpu.yaml"),
        os.path.join(ROOT, "tests", "fsdp_on_cpu.py")]
DDP = [*LAUNCH, "--multi_gpu"]


def _free_port() -> str:
    with socket.socket() as s:  # runs launched side by side need their own rendezvous port
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _start(launcher, flags, env=None, script="train.py"):
    if "accelerate.commands.launch" in launcher:
        launcher = [*launcher[:3], "--main_process_port", _free_port(), *launcher[3:]]
    return subprocess.Popen([*launcher, os.path.join(ROOT, script), *flags], cwd=ROOT, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc):
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-6000:]
    return out


def _load(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))


def test_fsdp2_on_two_cpu_processes_matches_ddp_and_resumes_bit_identically(tmp_path, tiny_flux_dir):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red cube on a blue cube\na dog with a blue cube\n")
    common = ["--model", tiny_flux_dir, "--reward-path", f"pickscore={build_tiny_pickscore(tmp_path / 'pickscore')}",
              "--prompts", str(prompts), "--height", "32", "--width", "32", "--max-sequence-length", "16",
              "--lora-rank", "8", "--lora-alpha", "16", "--dtype", "bf16", "--max-steps", "2", "--save-every", "1",
              "--ema-every", "1", "--num-steps", "4", "--branch-k", "2", "--branch-early", "0", "1", "--branch-late", "0", "2",
              "--gradient-checkpointing"]  # the GPU default: diffusers' checkpointing inside FSDP2's per-block units
    out = {name: tmp_path / name for name in ("fsdp", "ddp", "resumed")}
    runs = [_start(FSDP, [*common, "--output-dir", str(out["fsdp"])], CPU),
            _start(DDP, [*common, "--output-dir", str(out["ddp"])], CPU)]
    # What a run stopped after step 1 leaves (--stop-after-steps 1 ends the loop after the same save;
    # tests/test_train.py checks that on one process), resumed with --resume latest, started as soon
    # as checkpoint-1 is complete (it appears by an atomic rename).
    while not (out["fsdp"] / "checkpoint-1").exists() and runs[0].poll() is None:
        time.sleep(0.2)
    shutil.copytree(out["fsdp"] / "checkpoint-1", out["resumed"] / "checkpoint-1")
    runs.append(_start(FSDP, [*common, "--output-dir", str(out["resumed"]), "--resume", "latest"], CPU))
    logs = [_wait(p) for p in runs]
    assert "processes (world size): 2" in logs[0] and "memory per GPU" in logs[0]
    assert "resumed from" in logs[2]

    fsdp, ddp, resumed = (out[n] / "checkpoint-2" for n in ("fsdp", "ddp", "resumed"))
    # The FSDP path ran: the optimizer state is sharded (one shard per rank file, none in trainer_state.pt).
    assert torch.load(fsdp / "trainer_state.pt", weights_only=False)["optimizer"] is None
    shards = [torch.load(fsdp / f"rank{r}.pt", weights_only=False)["optimizer"]["state"] for r in (0, 1)]
    assert shards[0] and shards[1]
    assert torch.load(ddp / "trainer_state.pt", weights_only=False)["optimizer"] is not None

    # FSDP = DDP within bf16 precision (2^-8 of each tensor's scale); the LoRA moved from its init (B = 0).
    a, b = _load(fsdp / "lora"), _load(ddp / "lora")
    assert a.keys() == b.keys()
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 0
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 2**-8 * a[k].abs().max(), k

    # Stopped + resumed = uninterrupted, bit for bit: LoRA, EMA and each rank's optimizer shard.
    for which in ("lora", "ema"):
        x, y = _load(fsdp / which), _load(resumed / which)
        assert all(torch.equal(x[k], y[k]) for k in x), which
    for r in (0, 1):
        x, y = (torch.load(d / f"rank{r}.pt", weights_only=False)["optimizer"]["state"] for d in (fsdp, resumed))
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (DTensor shards)
        assert x.keys() == y.keys() and all(torch.equal(local(x[i][n]), local(y[i][n])) for i in x for n in x[i])

    # The exported LoRA is a diffusers FLUX LoRA.
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(str(fsdp / "ema"))
    ema = _load(fsdp / "ema")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(ema)
    key = next(k for k in ema if "lora_B" in k)
    name = key.removeprefix("transformer.").replace("lora_B.weight", "lora_B.default_0.weight")
    assert torch.equal(loaded[name].float(), ema[key].float())
