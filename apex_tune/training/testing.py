"""The one testing seam: fault injection for the reliability tests, inert unless the
variables are set. Production code calls :func:`fault_point` at named points and
nothing else; what a point does lives here.

``APEX_TUNE_KILL_AT=<point>`` SIGKILLs the process when it reaches ``<point>``
(``rank1:<point>``: only on rank 1). Points: ``assess:<i>``, ``step:<n>``,
``save:<label>``, ``save_state:<label>``, ``state_renaming:<label>`` (the
resume state is written but not yet renamed into place).

``APEX_TUNE_KILL_ONCE=<path>`` makes the kill happen once: the first process to
reach the point creates ``<path>`` and dies; later ones (a run restarted by
torchrun's ``--max-restarts``, which re-runs the same command with the same
environment) see the file and go on.

``APEX_TUNE_NAN_GRAD_AT=<n>`` makes the gradients of optimizer step ``n`` NaN at the
point ``gradients:<n>`` (the recipe passes its model there).
"""

import os
import signal
from typing import Optional

from torch import nn

KILL_AT_ENV = "APEX_TUNE_KILL_AT"
KILL_ONCE_ENV = "APEX_TUNE_KILL_ONCE"
NAN_GRAD_ENV = "APEX_TUNE_NAN_GRAD_AT"


def fault_point(name: str, model: Optional[nn.Module] = None) -> None:
    """Reached ``name``: inject the fault the environment asks for there, if any."""
    if model is not None and name == f"gradients:{os.environ.get(NAN_GRAD_ENV)}":
        for p in model.parameters():
            if p.grad is not None:
                p.grad.fill_(float("nan"))
    target = os.environ.get(KILL_AT_ENV)
    if target is None:
        return
    if target.startswith("rank"):
        rank, _, target = target.partition(":")
        if rank != f"rank{os.environ.get('RANK', '0')}":
            return
    if target != name:
        return
    marker = os.environ.get(KILL_ONCE_ENV)
    if marker is not None:
        try:  # O_EXCL: exactly one process ever creates it
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
