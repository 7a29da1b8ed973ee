"""Fault injection for the reliability tests; inert unless the variables are set.

``APEX_TUNE_KILL_AT=<point>`` SIGKILLs the process when it reaches ``<point>``
(``rank1:<point>``: only on rank 1). Points: ``assess:<i>``, ``step:<n>``,
``save:<label>``, ``save_state:<label>``, ``state_renaming:<label>`` (the
resume state is written but not yet renamed into place).
"""

import os
import signal

KILL_AT_ENV = "APEX_TUNE_KILL_AT"


def fault_point(name: str) -> None:
    target = os.environ.get(KILL_AT_ENV)
    if target is None:
        return
    if target.startswith("rank"):
        rank, _, target = target.partition(":")
        if rank != f"rank{os.environ.get('RANK', '0')}":
            return
    if target == name:
        os.kill(os.getpid(), signal.SIGKILL)
