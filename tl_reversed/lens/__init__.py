"""The backward lens: gradients read in the vocabulary.

Built on :mod:`tl_reversed.core`.
"""
