"""Run a script on accelerate's FSDP path with CPU processes (gloo), for tests/test_fsdp.py:

    ACCELERATE_USE_CPU=true accelerate launch --config_file accelerate_configs/fsdp_8gpu.yaml \
        --num_processes 2 --mixed_precision no tests/fsdp_on_cpu.py train.py ARGS

accelerate turns FSDP into DDP on CPU: `AcceleratorState.__init__` (accelerate/state.py) switches
the distributed type to FSDP, when ACCELERATE_USE_FSDP or an FSDP plugin asks for it, only inside
its branch for accelerator devices (MULTI_GPU, MULTI_NPU, ...); CPU processes are MULTI_CPU and
keep DDP. This launcher builds the processes' PartialState (gloo, device CPU) first and labels it
MULTI_GPU before the script's Accelerator is created, so that accelerate's own FSDP code runs:
the script's FSDP plugin and the launch config's FSDP_* settings (FSDP2, fully_shard per FLUX
block), sharded parameters and optimizer state. Nothing in accelerate is edited; the device
stays the CPU.
"""

import os
import runpy
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

if __name__ == "__main__":
    state = PartialState(cpu=True)  # initialises gloo from the launcher's environment
    if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP") != "true":
        sys.exit(f"fsdp_on_cpu.py: expected CPU processes launched with an FSDP config, got {state.distributed_type}")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # read once, by AcceleratorState
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
