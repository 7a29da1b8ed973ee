"""Run torchtune's own ``full_finetune_distributed`` recipe on CPU (test helper).

torchtune 0.6.1's recipe makes two CUDA-only calls unconditionally: rank 0 calls
``training.get_memory_stats`` while setting up the model (ValueError on CPU:
"Logging memory stats is not supported on CPU devices"), and every rank calls
``training.cleanup_before_training`` before training (AttributeError: module
'torch.cpu' has no attribute 'empty_cache'). This launcher replaces only those
calls by no-ops and runs the recipe file unchanged:

    torchrun --nproc_per_node 2 tests/torchtune_distributed_on_cpu.py --config my.yaml ...
"""

import runpy
import sys
from pathlib import Path

import torchtune
from torchtune import training

training.get_memory_stats = lambda device, reset_stats=True: {}
training.log_memory_stats = lambda stats, message="": None
training.cleanup_before_training = lambda: None

# Where `tune run` finds it (torchtune._cli.run: ROOT / "recipes").
recipe = Path(torchtune.__file__).parent.parent / "recipes" / "full_finetune_distributed.py"
sys.argv = [str(recipe)] + sys.argv[1:]
runpy.run_path(str(recipe), run_name="__main__")
