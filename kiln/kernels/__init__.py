"""Triton kernels, each beside its pure-torch reference and a dispatcher.

Imports nothing from the rest of kiln: the model calls these dispatchers, so
CPU and GPU run the same model code.
"""
