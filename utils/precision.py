"""Precision and determinism: the autocast context of a run's ``precision`` (with the warning for
bf16 on a CPU without bf16 instructions) and ``deterministic: true`` (torch's deterministic
algorithms, the cuBLAS workspace, no cuDNN benchmarking; ``utils.rundir.start_run`` sets it first).
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext

import torch

logger = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX). Without them
    oneDNN emulates bf16 and CPU autocast is several times *slower* than fp32 (docs/PERFORMANCE.md)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume it can
        return True


_warned_slow_bf16 = False


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (fp32: none). bf16 on a CPU without
    native bf16 is warned about once: it runs, but slower than fp32."""
    global _warned_slow_bf16
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16" and device.type == "cpu" and not _warned_slow_bf16 and not cpu_has_bf16():
        _warned_slow_bf16 = True
        logger.warning("precision bf16 on a CPU without bf16 instructions (AVX512-BF16 / AMX; this one has %s): "
                       "bf16 is emulated and slower than fp32 here (8.5x slower for a 3152x384x1536 linear "
                       "measured on an AVX2 EPYC); use precision fp32 on this machine",
                       torch.backends.cpu.get_cpu_capability())
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])

def set_deterministic(on: bool) -> None:
    """``deterministic: true``: bitwise repeatable runs on the same machine and software (same
    thread count, same GPU). Kernels with a non-deterministic reduction order are replaced by
    deterministic ones, or raise naming themselves where torch has none. On CPU the one we hit is
    the backward of advanced indexing (``image_tokens[neg_idx]`` in the ITM loss): with several
    threads and >= 32768 elements it accumulates with float atomics."""
    if on:
        # cuBLAS reads this when it creates its first handle, i.e. before any model exists.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False  # benchmarking may pick a different algorithm per run
    torch.use_deterministic_algorithms(on)
