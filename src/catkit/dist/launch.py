"""Run a function on W local processes with a process group each (tests, benchmark smoke runs).

``run_local(fn, world_size, *args)`` spawns W processes, gives each a process group on a free
TCP port (bound to port 0 to find one), calls ``fn(rank, world_size, *args)`` and returns the W
return values (they must pickle). A hung collective cannot hang the caller: the group has a
timeout and the whole run a deadline, after which the children are killed and ``TimeoutError``
raised. An exception in any rank is re-raised here with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, backend, timeout_s, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # W processes share the machine's cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        out = fn(rank, world_size, *args)
        queue.put((rank, True, out))
        try:  # no rank tears its connections down while a peer still uses them (gloo aborts then)
            dist.barrier()
        except Exception:  # noqa: BLE001 - the result is already reported
            pass
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 120.0) -> list:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]`` computed on W spawned processes."""
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pc = mp.start_processes(_entry, args=(fn, world_size, free_port(), backend, timeout_s, args, queue),
                            nprocs=world_size, join=False, start_method="spawn")
    results: dict[int, object] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if errors and left <= 0:
                break  # the other ranks are stuck in a collective the failed rank never joined
            if left <= 0:
                raise TimeoutError(f"run_local: {world_size} ranks did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, payload = queue.get(timeout=min(left, 1.0))
            except Exception:  # queue.Empty: check that no child died without reporting
                if any(p.exitcode not in (None, 0) for p in pc.processes) and queue.empty():
                    time.sleep(0.5)
                    if queue.empty():
                        codes = [p.exitcode for p in pc.processes]
                        raise RuntimeError(f"run_local: a rank died without reporting (exit codes {codes})")
                continue
            if ok:
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                deadline = min(deadline, time.monotonic() + 5.0)
        if errors:
            raise RuntimeError("run_local: rank(s) failed\n" + "\n".join(errors))
        pc.join(timeout=30)
        return [results[r] for r in range(world_size)]
    finally:
        for p in pc.processes:
            if p.is_alive():
                p.kill()
