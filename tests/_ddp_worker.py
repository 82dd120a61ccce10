"""Run under torchrun by tests/test_train.py: probe BatchNormReLU2d(sync=True), then the training CLI.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py <train options>

Rank 0 writes <output-dir>/sync_probe.json: whether BatchNormReLU2d(sync=True) normalized each rank's
shard with the statistics of the whole batch (what torch.nn.SyncBatchNorm does).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedcnn.nn as fnn
from fusedcnn.train import main


def probe_sync_bn() -> bool:
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(4 * world, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    bn = fnn.BatchNormReLU2d(3, backend="cpp", sync=True).train()
    out = bn(x[4 * rank: 4 * (rank + 1)])
    expect = F.relu(F.batch_norm(x, None, None, training=True))[4 * rank: 4 * (rank + 1)]
    ok = torch.tensor([float(torch.allclose(out, expect, rtol=1e-4, atol=1e-5))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # run() joins this group and leaves it to us
    synced = probe_sync_bn()
    argv = sys.argv[1:]
    status = main(argv)
    if dist.get_rank() == 0:
        out_dir = argv[argv.index("--output-dir") + 1]
        with open(os.path.join(out_dir, "sync_probe.json"), "w") as f:
            json.dump({"synced": synced}, f)
    dist.destroy_process_group()
    sys.exit(status)
