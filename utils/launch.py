"""Start a function in several local processes that form a torch.distributed process group, and
collect their results: what utils/parallel.py (and notebook 10) runs expert parallelism with.

`launch(fn, world_size, *args)` spawns world_size new Python processes ("ranks"), each joining one
group (gloo on CPU, nccl with one GPU per rank), runs fn(rank, world_size, *args) in each and
returns the results in rank order. It fails fast and says why: an exception in a rank, a rank that
dies without a result, a function a new process cannot import (one defined in a notebook cell).
PyTorch's own launcher, torchrun, does the same from the command line.
"""
import faulthandler
import io
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import is_count


def free_port():
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_IMPORT_HINT = ("fn must be defined in an importable module (a .py file, imported by the notebook or "
                "script), not in a notebook cell or an interactive session: each rank is a new Python "
                "process that imports fn by its module and name")


def _worker(rank, world_size, port, backend, fn_bytes, args, results, crash_log):
    """One rank of launch: report (rank, torch.save'd result, None) or (rank, None, error text)."""
    torch.set_num_threads(1)
    with open(crash_log, "w") as log:
        faulthandler.enable(log)                 # a segfault or abort leaves its Python traceback here
        try:
            try:
                fn = pickle.loads(fn_bytes)      # fn is sent as bytes so that failing to import it is reported
            except Exception:
                results.put((rank, None, f"{traceback.format_exc()}\n{_IMPORT_HINT}"))
                return
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
            buffer = io.BytesIO()                # sent as bytes: tensors then outlive this process
            torch.save(fn(rank, world_size, *args), buffer)
            results.put((rank, buffer.getvalue(), None))
        except Exception:
            results.put((rank, None, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            faulthandler.disable()


def _death_report(rank, exitcode, crash_log):
    """Why a rank's process ended without reporting: its exit code or signal, what faulthandler
    wrote, and the likely causes."""
    how = f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with code {exitcode}"
    try:
        with open(crash_log) as log:
            trace = log.read().strip()
    except OSError:
        trace = ""
    text = f"rank {rank} {how} before reporting a result"
    if trace:
        text += f"; its last Python frames:\n{trace}"
    return (text + "\nIt may have crashed (os._exit, a segfault, out of memory), or failed to start: fn and its "
            f"arguments must be picklable and importable by a new process; {_IMPORT_HINT}. A child's own "
            "traceback, if any, was printed on the standard error of the process that started Python or Jupyter.")


def launch(fn, world_size, *args, backend=None, timeout=120):
    """Run fn(rank, world_size, *args) in world_size new local processes that form a process group,
    and return the list of their results, in rank order.

    fn must be importable (defined in a module, not in a notebook cell), and its arguments and
    result picklable. backend: "gloo" (CPU) by default, "nccl" when a GPU per rank is available.
    Each process uses one CPU thread. An exception in any rank is raised here with its traceback;
    a rank whose process ends without a result (it could not import fn, called os._exit, crashed)
    raises a RuntimeError at once, naming the rank and its exit code; a rank that gives no result
    within `timeout` seconds raises a RuntimeError. The other ranks are then terminated.
    """
    if not is_count(world_size) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    try:
        fn_bytes = pickle.dumps(fn)
    except Exception as err:
        raise ValueError(f"fn cannot be sent to the new processes ({err}); {_IMPORT_HINT}") from err
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    logs = tempfile.TemporaryDirectory(prefix="launch-")
    crash_logs = [os.path.join(logs.name, f"rank{rank}.log") for rank in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(rank, world_size, port, backend, fn_bytes, args, results, crash_logs[rank]))
             for rank in range(world_size)]
    outputs = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(outputs) < world_size:
            try:
                rank, value, error = results.get(timeout=0.1)
            except queue.Empty:
                silent = [r for r, p in enumerate(procs) if r not in outputs and p.exitcode is not None]
                if silent:
                    # Its result may still be in the pipe: an exited process has flushed what it put.
                    try:
                        rank, value, error = results.get(timeout=1.0)
                    except queue.Empty:
                        r = silent[0]
                        raise RuntimeError(_death_report(r, procs[r].exitcode, crash_logs[r])) from None
                elif time.monotonic() > deadline:
                    raise RuntimeError(f"no result from {world_size - len(outputs)} rank(s) within {timeout} s") from None
                else:
                    continue
            if error is not None:
                # A rank that died silently is often the cause of another's error ("Connection closed by peer").
                dead = [_death_report(r, p.exitcode, crash_logs[r]).split("\n")[0]
                        for r, p in enumerate(procs) if r != rank and r not in outputs and p.exitcode not in (None, 0)]
                raise RuntimeError(f"rank {rank} failed:\n{error}" + "".join(f"\n(also: {d})" for d in dead))
            outputs[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            if p.pid is not None:                # started
                p.join(timeout if len(outputs) == world_size else 0)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
        results.close()
        logs.cleanup()
    return [outputs[rank] for rank in range(world_size)]
