"""Pallas kernels of jsdr, each beside a pure-JAX reference that serves as its specification.

Installed as the import name `jsdr_kernels` (the repository folder `kernels/` is only its source root and
has no `__init__.py`, so it never becomes an importable `kernels` that could shadow the Hugging Face hub
package of that name, which `transformers` probes for). The modules here are leaves: they import nothing
from `jsdr` and register nothing on import; `jsdr.model.attention` imports them and registers them.

- `jsdr_kernels.flash_attention`: flash attention forward + backward (`impl="pallas"` of
  `jsdr.model.attention.attention`).
- `jsdr_kernels.paged_attention`: decode attention over a paged KV pool, looping only over the pages
  a sequence uses (`impl="pallas"` of `jsdr.model.attention.paged_attention` for decode steps).
"""
