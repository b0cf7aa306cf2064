"""The experiments of the paper: tasks, head rankings, the perturbation test, attention patching, evaluation.

Built on :mod:`tl_reversed.core`; figures are drawn by :mod:`tl_reversed.views`.
"""
