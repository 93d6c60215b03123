"""Build the DeepSpeed C++ extensions the engine loads on CPU (cpu_adam for optimiser offload, shm_comm for
every CPU process group) once, at install: a run or test that builds one on first use and is killed mid-build
(the kill tests do that on purpose) leaves the build's lock, and every later build waits for it forever.
Cached under ~/.cache/torch_extensions; about 1.5 minutes on 2 cores. Exits 0 with a warning without a compiler."""
import sys

from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder import CPUAdamBuilder

# each the way DeepSpeed builds it at run time (deepspeed/ops/adam/cpu_adam.py, deepspeed/comm/torch.py): another
# builder class writes other flags into build.ninja, and the next run would rebuild
for builder in (CPUAdamBuilder(), get_accelerator().create_op_builder("ShareMemCommBuilder")):
    try:
        builder.load(verbose=False)
    except Exception as error:  # no C++ compiler: runs needing the op fail later with DeepSpeed's own message
        print(f"warning: DeepSpeed's {builder.NAME} did not build ({type(error).__name__}): runs that need it fail",
              file=sys.stderr)
