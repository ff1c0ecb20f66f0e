"""One process of ``test_triton_backend.py::test_uneven_and_empty_dtensor_shards_on_two_processes``, launched
with ``torch.distributed.run --nproc_per_node 2``: DTensor parameters sharded unevenly over two CPU processes
(one rank's shard of a one-row tensor is empty), stepped by the kernel in Triton's interpreter on their local
shards, against the same tensors stepped whole. Writes ``DIR/rank{N}.txt`` (DIR: its one argument): ``ok`` and
the local sizes, or what differed (a file per rank: the two ranks' standard outputs interleave)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor  # noqa: E402

from dualadam_hf import DualAdam  # noqa: E402
from dualadam_hf.optim import triton_backend, triton_kernels  # noqa: E402

SHAPES = [(3, 4), (1, 5), (5,), (8, 2)]  # split by rows: 2 + 1, 1 + 0, 3 + 2, 4 + 4
STEPS = 6  # alpha = 1 - 0.3 t: the kernel for steps 1-3, torch's fused AdamW from step 4


def main() -> None:
    triton_backend.DEVICES = ("cuda", "cpu")
    assert triton_backend.available("cpu")  # its probing launch made before the count starts
    launches = []
    kernel = triton_kernels.dualadam_kernel

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    triton_kernels.dualadam_kernel = Counted()
    dist.init_process_group("gloo")
    try:
        mesh = DeviceMesh("cpu", [0, 1])
        generator = torch.Generator().manual_seed(0)
        initial = [torch.randn(shape, generator=generator) for shape in SHAPES]
        grads = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(STEPS)]
        whole = [torch.nn.Parameter(t.clone()) for t in initial]
        sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in initial]
        kwargs = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, switch_rate=0.3)
        whole_optimizer, sharded_optimizer = DualAdam(whole, **kwargs), DualAdam(sharded, **kwargs)
        for step_grads in grads:
            for p, q, g in zip(whole, sharded, step_grads):
                p.grad = g.clone()
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            whole_optimizer.step()
            sharded_optimizer.step()
        differing = [i for i, (p, q) in enumerate(zip(whole, sharded)) if not torch.equal(p.detach(), q.full_tensor())]
        local_sizes = [q.to_local().numel() for q in sharded]
        rank = dist.get_rank()
        # each optimizer launches once per blending step (3), on both ranks
        if differing or len(launches) != 2 * 3:
            result = f"tensors {differing} differ; {len(launches)} launches; local sizes {local_sizes}"
        else:
            result = f"ok, local sizes {local_sizes}"
        (Path(sys.argv[1]) / f"rank{rank}.txt").write_text(result, encoding="utf-8")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # torch 2.13's gloo run-loop thread can release the last all-gather's work (and with it a tensor's Python
    # object) while the interpreter finalizes, which aborts the process ("terminate called without an active
    # exception", seen in CI once in about ten runs). The rank's file is written and the group destroyed:
    # leave without finalizing.
    os._exit(0)
