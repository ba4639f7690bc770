"""How a process computes, and the record of it: pinned CPU threads and the provenance of results.

On the CPU, PyTorch splits reductions (bias gradients, means, some GEMM paths) across its intra-op
threads, so the same seeded run gives other bits under another thread count. Every deterministic
stage (base pretraining, training, merge evaluation) therefore runs on exactly one intra-op thread
and gets its parallelism from processes instead (the suite's and the sweep's `--jobs`): the bits
then depend only on the code, the library versions and the CPU model (the math libraries choose
kernels by more than the instruction set).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

Job = TypeVar("Job")

DETERMINISTIC_THREADS = 1


def pin_threads(device: torch.device | str = "cpu") -> None:
    """One intra-op thread for a CPU stage (a GPU stage keeps the default: its kernels decide)."""
    if torch.device(device).type == "cpu":
        torch.set_num_threads(DETERMINISTIC_THREADS)
        keep_freed_memory()


def c_library() -> ctypes.CDLL:
    """The process's C library (raises OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def keep_freed_memory() -> None:
    """glibc hands activations of a megabyte or more back to the kernel when they are freed, so every
    step faults them in again (measured on the offline ViT Trap² step: page faults 645k -> 147k a
    benchmark run, about 8 % of the step time); keep them in the heap instead. Changes no result; a
    no-op where the C library is not glibc."""
    try:
        mallopt = c_library().mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 256 << 20)  # blocks below 256 MiB come from the heap ...
    mallopt(m_trim_threshold, 1 << 30)  # ... and the heap keeps up to 1 GiB of freed memory


def die_with_parent(parent: int) -> None:
    """A worker's initializer: the kernel sends it SIGTERM when the process that spawned it dies, so a
    killed or crashed suite leaves no orphan training on and holding its run's folder lock (Linux; elsewhere
    only the check below, made once at start)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        c_library().prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request above took hold
        os._exit(1)


def default_jobs(device: str = "auto") -> int:
    """Processes to run at once: one per core on the CPU (each computes on one thread), 1 on a GPU."""
    on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return 1 if on_gpu else (os.cpu_count() or 1)


def run_jobs(work: Callable[[Job], object], jobs: Sequence[Job], processes: int, desc: str,
             label: Callable[[Job], str] = str) -> None:
    """Calls `work(job)` for every job, `processes` at a time in fresh worker processes (here when 1),
    under one progress bar; the first failure cancels what has not started and names its job.

    `work` must be a module-level function and each job picklable (workers are spawned).
    """
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            work(job)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool, \
            tqdm(total=len(jobs), desc=f"{desc}, {processes} at a time", unit="job") as bar:
        pending = {pool.submit(work, job): job for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise RuntimeError(f"{label(job)} failed: {future.exception()}") from future.exception()
                bar.set_postfix_str(label(job))
                bar.update()


def code_commit() -> str:
    """The repository's commit (with `+dirty` for uncommitted changes), or `unknown` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


@functools.cache  # the CPU does not change under a process: read /proc/cpuinfo once
def cpu_model() -> str:
    """The CPU's vendor, family, model and name, e.g. `GenuineIntel 6/207 Intel(R) Xeon(R) Processor`: two CPUs
    of one instruction set can still give other bits (the math libraries choose kernels by more than it)."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return (f"{fields.get('vendor_id', '?')} {fields.get('cpu family', '?')}/{fields.get('model', '?')} "
            f"{fields.get('model name', '?')}")


def provenance(base_fingerprint: str | None = None) -> dict:
    """What produced a result: base, code, threads, CPU instruction set and model, and library versions."""
    import numpy
    import peft
    import transformers

    return {"base_fingerprint": base_fingerprint, "code_commit": code_commit(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(), "machine": platform.machine(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__}}


def run_cli(main: Callable[[], None]) -> None:
    """Runs a command: a bad input, file or setting ends it with one line, `error: <what and how to fix it>`
    (exit status 2), not a traceback; --debug (anywhere on the command line) shows the traceback."""
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        main()
    except (ValueError, KeyError, OSError) as e:
        if debug:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no GPU is visible; use --device cpu")
    return device
