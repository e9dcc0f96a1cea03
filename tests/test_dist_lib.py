"""`utils.dist.all_gather_with_grad` (torch.distributed.nn's all_gather) gives the gradients of the
hand-written autograd gather it replaced. This file is also the torchrun worker: run as a script,
each rank gathers, backpropagates its own loss and saves what it got."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from utils import dist as du

WORLD, ROWS, DIM = 2, 3, 5


def _input(rank: int) -> torch.Tensor:
    return torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(100 + rank))


def _weights(rank: int) -> torch.Tensor:
    # Different on every rank, so a gradient taken from the wrong rank or scaled by 1/world shows.
    return torch.randn(WORLD * ROWS, DIM, generator=torch.Generator().manual_seed(200 + rank))


def _loss(gathered: torch.Tensor, rank: int) -> torch.Tensor:
    # Quadratic, so the gradient also depends on the gathered values, not only on the weights.
    return (_weights(rank) * gathered ** 2).sum()


def _worker(out_dir: Path) -> None:
    info = du.init_distributed("cpu")
    x = _input(info.rank).requires_grad_()
    gathered = du.all_gather_with_grad(x)
    _loss(gathered, info.rank).backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, out_dir / f"rank{info.rank}.pt")
    du.cleanup()


@pytest.mark.dist
def test_all_gather_with_grad_matches_old_backward(tmp_path, run_torchrun):
    run_torchrun("tests/test_dist_lib.py", [tmp_path], nproc=WORLD)
    inputs = [_input(r) for r in range(WORLD)]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["gathered"], torch.cat(inputs))
        # The old backward all-reduced (summed) every rank's gradient w.r.t. the gathered tensor
        # and took this rank's rows: d/dx_r sum_s sum(W_s * G**2) = sum_s 2 * W_s[rows of r] * x_r.
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        expected = sum(2 * _weights(s)[rows] * inputs[rank] for s in range(WORLD))
        torch.testing.assert_close(got["grad"], expected)


def test_all_gather_with_grad_single_process_is_identity():
    x = torch.randn(ROWS, DIM, requires_grad=True)
    assert du.all_gather_with_grad(x) is x


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
