"""Effective ranks of a stage's weight changes, computed on one background thread.

At a stage boundary the recipe folds the stage (``end_stage(..., weight_changes=True)``
hands back each tuned slice's change), submits the changes here, writes the boundary
checkpoint while they are ranked, and joins right before it records the ranks: the
work overlaps the checkpoint instead of lengthening the boundary, and the values are
those of :func:`~apex_tune.modules.effective_rank.effective_rank` (same code, same
float64 arithmetic). An error in the worker is raised again at :meth:`join`.
"""

import ctypes
import functools
import glob
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

import torch

from apex_tune.modules.effective_rank import effective_ranks


@functools.lru_cache(maxsize=1)
def _torch_cpu_library() -> Optional[ctypes.CDLL]:
    paths = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*torch_cpu.*"))
    try:
        return ctypes.CDLL(paths[0]) if paths else None
    except OSError:
        return None


def _one_intra_op_thread() -> None:
    """The worker's own intra-op threads: one. The eigendecompositions are small (at most
    the model width square), and a second OpenMP/MKL team would compete with the main
    thread writing the checkpoint. ``torch.set_num_threads`` cannot do it: besides this
    thread's OpenMP setting it changes the process-wide count that every thread created
    afterwards starts from. OpenMP's ``omp_set_num_threads`` and MKL's
    ``MKL_Set_Num_Threads_Local`` act on the calling thread only; where torch is built
    without them (no MKL, no OpenMP) the worker keeps the process's count."""
    torch.get_num_threads()  # ATen's once-per-thread set-up first, or it would undo the below later
    library = _torch_cpu_library()
    for setter in ("omp_set_num_threads", "MKL_Set_Num_Threads_Local"):
        if library is not None and hasattr(library, setter):
            getattr(library, setter)(1)


def _rank(changes: List[Dict[str, torch.Tensor]], copied: Optional["torch.cuda.Event"]) -> List[Dict[str, float]]:
    if copied is not None:  # the device-to-host copies were queued without waiting
        copied.synchronize()
    return effective_ranks(changes)


class BackgroundEffectiveRanks:
    """One stage's effective ranks at a time, on one worker thread (torch's kernels release
    the GIL). Use as a context manager: leaving it waits for the worker and stops it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="apex-effective-rank", initializer=_one_intra_op_thread
        )
        self._pending: Optional[Future] = None

    def submit(self, changes: List[Dict[str, torch.Tensor]]) -> None:
        """Start ranking per-layer {projection: weight change} (from ``fold_apex_(...,
        weight_changes=True)``); nobody may write the tensors until :meth:`join`."""
        if self._pending is not None:
            raise RuntimeError("the previous stage's effective ranks were never joined")
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()
            copied.record()  # after the fold's non-blocking copies to the host on this stream
        self._pending = self._executor.submit(_rank, changes, copied)

    def join(self) -> List[Dict[str, float]]:
        """The submitted stage's per-layer {projection: effective rank}; waits for the worker
        and raises whatever it raised."""
        if self._pending is None:
            raise RuntimeError("no effective ranks were submitted")
        pending, self._pending = self._pending, None
        return pending.result()

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "BackgroundEffectiveRanks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
