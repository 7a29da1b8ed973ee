"""Silence exactly one torchao log line: "Skipping import of cpp extensions ...".

The filter lives in the top-level module ``apex_tune_quiet_torchao``, which the
installed ``apex_tune_quiet_torchao.pth`` loads at every interpreter start, early
enough for the ``tune`` CLI (torchtune imports torchao before any apex_tune code
runs). Imported first by ``apex_tune`` and the recipe, this installs the same
filter where site-packages' .pth files were not processed (``python -S``).
Every other torchao message still shows.
"""

from apex_tune_quiet_torchao import SILENCED_PREFIX, install_filter

__all__ = ["SILENCED_PREFIX", "install_filter"]

install_filter()
