"""Effective ranks of a stage's weight changes, computed on one background thread.

At a stage boundary the recipe folds the stage (``end_stage(..., weight_changes=True)``
hands back each tuned slice's change), writes the boundary checkpoint, and submits the
changes here with what must follow the ranks: recording them and making the boundary's
resume state current. The boundary then ends, and the ranks are computed while the
next stage trains: on a small machine even a second thread's work during the boundary
lengthens it by about that work (measured by ``python -m bench.effective_rank``),
whereas a stage's training time dwarfs it. The values are those of
:func:`~apex_tune.modules.effective_rank.effective_ranks` (same code, same float64
arithmetic). An error in the worker is raised again at :meth:`join`.
"""

import ctypes
import functools
import glob
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

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


Ranks = List[Dict[str, float]]


def _rank(
    changes: List[Dict[str, torch.Tensor]],
    copied: Optional["torch.cuda.Event"],
    then: Optional[Callable[[Ranks], None]],
) -> Ranks:
    if copied is not None:  # the device-to-host copies were queued without waiting
        copied.synchronize()
    ranks = effective_ranks(changes)
    if then is not None:
        then(ranks)
    return ranks


class BackgroundEffectiveRanks:
    """One stage's effective ranks at a time, on one worker thread (torch's kernels release
    the GIL). Use as a context manager, or call :meth:`close`: either waits for the
    worker (and what it was asked to do after the ranks) and stops it."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="apex-effective-rank", initializer=_one_intra_op_thread
        )
        self._pending: Optional[Future] = None

    def submit(
        self, changes: List[Dict[str, torch.Tensor]], then: Optional[Callable[[Ranks], None]] = None
    ) -> None:
        """Start ranking per-layer {projection: weight change} (from ``fold_apex_(...,
        weight_changes=True)``), then call ``then(ranks)`` on the worker; nobody may write
        the tensors until :meth:`join`."""
        if self._pending is not None:
            raise RuntimeError("the previous stage's effective ranks were never joined")
        copied = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            copied = torch.cuda.Event()
            copied.record()  # after the fold's non-blocking copies to the host on this stream
        self._pending = self._executor.submit(_rank, changes, copied, then)

    @property
    def pending(self) -> bool:
        """Whether ranks were submitted and not joined yet."""
        return self._pending is not None

    def done(self) -> bool:
        """Whether :meth:`join` would return without waiting."""
        return self._pending is not None and self._pending.done()

    def join(self) -> Ranks:
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
