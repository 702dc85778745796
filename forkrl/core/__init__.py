"""Pure tensor math: entropy, token selection, advantages, losses, sampling filters.

Nothing here does I/O or reads a config object; every function takes tensors and scalars.
"""
