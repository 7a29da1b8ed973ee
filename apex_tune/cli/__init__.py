"""The ``apex-tune`` command: shipped config names, ``assess``, ``params``, ``import-gguf``."""
