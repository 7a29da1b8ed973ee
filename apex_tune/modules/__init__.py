"""Components: the Monarch operator, the expansion wrappers, ranking, selection, the APEX
config and the model-level operations (wrap, fold, remove).

Nothing in this package imports ``apex_tune.training``, ``apex_tune.dev`` or ``apex_tune.cli``.
"""
