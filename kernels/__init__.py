"""Triton kernels, installed as dera_fast.kernels. Each module imports triton; import them lazily."""
