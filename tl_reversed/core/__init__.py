"""The core: model description and quirks, inputs, the pass engine, Reversed Attention, caches, model state and loading.

Imports nothing from the other layers (experiments, lens, views, commands).
"""
