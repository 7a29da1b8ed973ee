"""Training support (torchtune's ``training/`` analogue): the stage protocol, the assessment
pass, the recipe-state checkpoint format, run options and their one-line errors, the
distributed set-up, checks of untrusted files, memory options, plan and reports, and the
one testing seam (``testing``).

Used by the recipe, the benchmarks and the CLI; imports components, never the other way round.
"""
