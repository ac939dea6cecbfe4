"""Run an entry point (train.py, eval.py) in a fresh Python process with a fault injected first.

A fault that no command-line flag can cause (an optimizer step that leaves infinite weights, a
signal at a chosen moment) is injected by patching a library function in the child process before
the script runs, exactly as `python train.py ...` would otherwise run it:

    proc = run_script("train.py", args, patch=ADAM_SCALES_WEIGHTS.format(scale="float('inf')"))

`patch` is Python source executed in the child before the script (it may import torch, etc.).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# After AdamW's step number `at` (1-based, counted per process), multiply every parameter it
# updates by `scale`: inf makes the LoRA non-finite, 1e30 makes the next forward overflow.
ADAM_SCALES_WEIGHTS = """
import torch
_adam_step, _calls = torch.optim.AdamW.step, [0]
def _step(self, *args, **kwargs):
    out = _adam_step(self, *args, **kwargs)
    _calls[0] += 1
    if _calls[0] == {at}:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.mul_({scale})
    return out
torch.optim.AdamW.step = _step
"""

_RUNNER = """
import runpy, sys
exec(sys.argv[1])
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(script: str, args, patch: str = "", env=None, timeout: int = 300, popen: bool = False):
    """`python script args...` from the repository root with `patch` executed first; returns the
    CompletedProcess (or, with popen=True, the running Popen with text pipes)."""
    cmd = [sys.executable, "-c", _RUNNER, patch, os.path.join(ROOT, script), *map(str, args)]
    kw = dict(cwd=ROOT, env={**ENV, **(env or {})}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if popen:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=timeout, **kw)
