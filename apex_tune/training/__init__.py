"""Training support (torchtune's ``training/`` analogue): the stage protocol, the assessment
pass, the recipe-state checkpoint format, checks of untrusted files, memory options and plan.

Used by the recipe and the benchmarks; imports components, never the other way round.
"""
