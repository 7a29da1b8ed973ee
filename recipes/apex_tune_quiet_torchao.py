"""Loaded at interpreter start by ``apex_tune_quiet_torchao.pth`` (installed next to it).

torchao 0.15 logs "Skipping import of cpp extensions ..." when it is imported
under torch 2.13 (its C++ kernels are built for other torch versions; nothing
here uses them). torchtune imports torchao first thing, so the ``tune`` CLI
prints it before any apex_tune code can run: only a hook installed at start-up
is early enough. This one waits for the first ``import torchao`` (an entry on
``sys.meta_path`` that finds nothing itself), then filters exactly that message
from the "torchao" logger and removes itself. It imports neither torch nor
logging until torchao is imported.
"""

import sys

SILENCED_PREFIX = "Skipping import of cpp extensions"


def _not_skipping_cpp_extensions(record) -> bool:
    return not record.getMessage().startswith(SILENCED_PREFIX)


def install_filter() -> None:
    """Filter the message from the "torchao" logger (idempotent)."""
    import logging

    logger = logging.getLogger("torchao")
    if _not_skipping_cpp_extensions not in logger.filters:
        logger.addFilter(_not_skipping_cpp_extensions)


class _OnTorchaoImport:
    """A ``sys.meta_path`` entry that installs the filter when torchao is first imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "torchao":
            sys.meta_path.remove(cls)
            install_filter()
        return None  # the regular finders import it


if "torchao" in sys.modules:
    install_filter()
elif _OnTorchaoImport not in sys.meta_path:
    sys.meta_path.insert(0, _OnTorchaoImport)
