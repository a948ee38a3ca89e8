"""jsdr: SFT, GRPO and On-Policy Self-Distillation post-training of open LLMs in JAX/Flax.

Importing jsdr sets glibc's malloc for JAX's CPU backend when JAX will run on the CPU (see
`jsdr.hostmem`; `JSDR_CPU_MALLOC=0` turns it off).
"""

from jsdr import hostmem as _hostmem

_hostmem.configure()
