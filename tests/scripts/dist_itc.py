"""Run under torchrun by tests/test_train_retrieval.py: the ITC loss and its gradients of N ranks
on B samples each, written by rank 0 for comparison with one process on N*B samples."""
import sys

import torch

from tests.scripts.itc_case import itc_case
from utils import dist as du


def main(out: str) -> None:
    info = du.init_distributed("cpu")
    rank, world = info.rank, info.world_size
    loss, grads = itc_case(rank, world)
    for g in grads.values():
        du.all_reduce_sum(g)
        g /= world  # what DDP does
    loss = du.all_reduce_sum(loss.detach().clone()) / world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out)
    du.cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
