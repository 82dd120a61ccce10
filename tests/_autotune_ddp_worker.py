"""Run under torchrun by tests/test_autotune.py: two ranks whose timings disagree must take one decision.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_autotune_ddp_worker.py <output dir>

Each rank puts a stand-in backend ("cpp", computing torch.relu) in the activation family; rank 0 times it
1000x slower than torch, rank 1 1000x faster. Each rank writes rank<r>.json: its choices and their sources.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import fusedcnn.functional as FF
from fusedcnn import autotune
from fusedcnn.ops import _registry


class _StandIn:
    relu = staticmethod(lambda x, inplace: torch.relu(x))


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.pop("FUSEDCNN_BACKEND", None)
    os.environ.pop(autotune.ENV_SWITCH, None)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    _registry._IMPLEMENTATIONS["activation"]["cpp"] = _StandIn()
    autotune._candidates = lambda family, x, extra=(): (["torch", "cpp"], {})
    slow = "cpp" if rank == 0 else "torch"
    autotune._timer_hook = lambda name, s: s * 1000 + 1.0 if name == slow else s
    for shape in ((4, 3, 5, 5), (4, 6, 5, 5)):
        FF.relu(torch.randn(*shape, requires_grad=True)).sum().backward()
    decisions = autotune.decisions()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump({"choices": [d.choice for d in decisions], "sources": [d.source for d in decisions]}, f)
    dist.destroy_process_group()
