"""Device mesh and logical-axis sharding rules.

Every array that crosses a jit boundary is described by *logical* axis names ("embed", "mlp",
"act_batch", ...). A rules table maps each logical name to zero or more mesh axes of the
(data, fsdp, tensor) mesh. This is the only place where layout decisions live: a layout
experiment changes the rules or the mesh shape, never the model code.

A mesh axis is silently dropped for one dimension when it does not divide that dimension
(for example 2 KV heads on a tensor axis of 8); the array is then replicated along it, which
is always correct, only less memory efficient.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes (tuple) or None (replicated)
DEFAULT_RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "layers": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),  # flattened num_heads * head_dim
    "kv_heads": ("tensor",),  # flattened num_kv_heads * head_dim
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "lora_rank": None,
    # activations
    "act_batch": ("data", "fsdp"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_head_dim": None,
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the (data, fsdp, tensor) mesh. -1 in one axis means "all remaining devices"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        dims = [self.data, self.fsdp, self.tensor]
        for name, d in zip(MESH_AXES, dims):
            if d == 0 or d < -1:
                raise ValueError(f"mesh.{name}={d}: each mesh axis must be a positive size or -1")
        if dims.count(-1) > 1:
            raise ValueError(f"mesh={tuple(dims)}: at most one axis may be -1 (fill)")
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            if n_devices % known:
                raise ValueError(
                    f"mesh={tuple(dims)}: the fixed axes ({known} devices) do not divide the "
                    f"{n_devices} available devices")
            dims[dims.index(-1)] = n_devices // known
        if math.prod(dims) != n_devices:
            raise ValueError(
                f"mesh (data={dims[0]}, fsdp={dims[1]}, tensor={dims[2]}) uses {math.prod(dims)} "
                f"devices but {n_devices} are available; the product of the axes must equal the "
                f"device count (use -1 for one axis to fill)")
        return tuple(dims)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    shape = config.resolve(len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # topologies make_mesh cannot lay out: plain row-major order
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


# ---------------------------------------------------------------------------------------------
# The active (mesh, rules) pair. Model code calls `constrain(x, names)`; it is a no-op when no
# mesh is active, so the same code runs unsharded on one device.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar("jsdr_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: dict[str, tuple[str, ...] | None] | None = None) -> Iterator[Mesh]:
    """Make `mesh` (and `rules`, default DEFAULT_RULES) active for `constrain` and `logical_sharding`."""
    token = _ACTIVE.set((mesh, dict(DEFAULT_RULES if rules is None else rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    cur = _ACTIVE.get()
    return None if cur is None else cur[0]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules: dict | None = None) -> P:
    """PartitionSpec for logical axis `names`; mesh axes that do not divide `shape` are dropped."""
    if mesh is None or rules is None:
        cur = _ACTIVE.get()
        if cur is not None:
            mesh = mesh or cur[0]
            rules = rules or cur[1]
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; known: {sorted(rules)}")
        axes = [a for a in (rules[name] or ()) if a not in used]
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
            if shape is not None:
                # keep the longest prefix of axes whose product divides the dimension
                kept, prod = [], 1
                for a in axes:
                    if shape[i] % (prod * mesh.shape[a]) == 0:
                        kept.append(a)
                        prod *= mesh.shape[a]
                axes = kept
        used.update(axes)
        out.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
    return P(*out)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | None = None,
                     rules: dict | None = None) -> NamedSharding:
    mesh = mesh or active_mesh()
    if mesh is None:
        raise ValueError("logical_sharding needs a mesh: pass one or enter `use_mesh(mesh)`")
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; identity when no mesh is active."""
    cur = _ACTIVE.get()
    if cur is None:
        return x
    mesh, rules = cur
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh | None = None, rules: dict | None = None) -> Any:
    """Map a tree of logical-axis tuples and a matching tree of shapes (or arrays) to NamedShardings."""
    mesh = mesh or active_mesh()
    if mesh is None:
        raise ValueError("tree_shardings needs a mesh: pass one or enter `use_mesh(mesh)`")
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    return jax.tree.map(lambda names, s: logical_sharding(names, getattr(s, "shape", s), mesh, rules),
                        axes_tree, shapes_tree, is_leaf=is_axes)


def batch_sharding(ndim: int, mesh: Mesh | None = None, rules: dict | None = None, shape=None) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over (data, fsdp), the rest replicated."""
    names = ("act_batch",) + (None,) * (ndim - 1)
    mesh = mesh or active_mesh()
    spec = logical_to_spec(names, None, mesh, rules) if shape is None else logical_to_spec(names, shape, mesh, rules)
    return NamedSharding(mesh, spec)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    """Raise a clear error when a batch cannot be split over the data-parallel axes."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % dp:
        raise ValueError(f"{what} size {batch_size} is not divisible by the data-parallel size "
                         f"{dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def shard_batch(batch: Any, mesh: Mesh | None = None) -> Any:
    """Place a tree of host [batch, ...] arrays on the mesh, split over the data-parallel axes."""
    mesh = mesh or active_mesh()
    def put(x):
        x = np.asarray(x)
        check_batch_divisible(x.shape[0], mesh)
        return jax.device_put(x, batch_sharding(x.ndim, mesh, shape=x.shape))
    return jax.tree.map(put, batch)
