"""Which compute dtype the hardware runs fast: the one rule, for the decoder the server runs
(deliberate/settings.py) and for the coprocessor the worker and trainer run. It reads
/proc/cpuinfo and nvidia-smi, not torch, so that importing the settings stays cheap."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Literal

DtypeName = Literal["bfloat16", "float16", "float32"]


def auto_dtype() -> DtypeName:
    """bf16 on GPUs of compute capability 8.0 and newer, fp16 on older ones; on CPUs bf16 only
    with native bf16 math (AVX512-BF16 or AMX): on AVX2-only CPUs bf16 matmuls are emulated
    and 4-50x slower than fp32 (measured)."""
    gpu = gpu_compute_capability()
    if gpu is not None:
        return "bfloat16" if gpu >= (8, 0) else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_compute_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability from nvidia-smi; None without a GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        major, _, minor = out[0].partition(".")
        return int(major), int(minor or 0)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None
