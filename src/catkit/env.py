"""Every environment variable catkit reads, in one place (DESIGN rule 6)."""

from __future__ import annotations

import os


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def runs_dir() -> str:
    """Where the CLI writes run folders (``CATKIT_RUNS``, default ``runs``)."""
    return os.environ.get("CATKIT_RUNS", "runs")


def distributed_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as set by ``torchrun``; (0, 0, 1) otherwise."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
    )
