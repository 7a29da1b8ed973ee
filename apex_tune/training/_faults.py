"""Fault injection for the reliability tests; inert unless the variables are set.

``APEX_TUNE_KILL_AT=<point>`` SIGKILLs the process when it reaches ``<point>``
(``rank1:<point>``: only on rank 1). Points: ``assess:<i>``, ``step:<n>``,
``save:<label>``, ``save_state:<label>``, ``state_renaming:<label>`` (the
resume state is written but not yet renamed into place).

``APEX_TUNE_KILL_ONCE=<path>`` makes the kill happen once: the first process to
reach the point creates ``<path>`` and dies; later ones (a run restarted by
torchrun's ``--max-restarts``, which re-runs the same command with the same
environment) see the file and go on.
"""

import os
import signal

KILL_AT_ENV = "APEX_TUNE_KILL_AT"
KILL_ONCE_ENV = "APEX_TUNE_KILL_ONCE"


def fault_point(name: str) -> None:
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
