"""Silence exactly one torchao log line: "Skipping import of cpp extensions ...".

torchao 0.15 logs it at import under torch 2.13 (its C++ kernels are built for
other torch versions; apex_tune does not use them). Imported first by
``apex_tune`` and the recipe, before anything imports torchao; every other
torchao message still shows.
"""

import logging

SILENCED_PREFIX = "Skipping import of cpp extensions"


class SkipCppExtensionsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(SILENCED_PREFIX)


_logger = logging.getLogger("torchao")
if not any(isinstance(f, SkipCppExtensionsFilter) for f in _logger.filters):
    _logger.addFilter(SkipCppExtensionsFilter())
