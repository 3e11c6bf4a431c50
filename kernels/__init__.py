"""Triton kernels of segvit, importable as ``segvit.kernels`` (never as a top-level ``kernels``)."""
