"""Pallas kernels of jsdr, each beside a pure-JAX reference that serves as its specification.

- `kernels.flash_attention`: flash attention forward + backward (registers `impl="pallas"` in
  `jsdr.model.attention` on import).
"""
