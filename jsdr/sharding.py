"""Device mesh and logical-axis sharding rules.

Every array that crosses a jit boundary is described by *logical* axis names ("embed", "mlp",
"act_batch", ...). A rules table maps each logical name to zero or more mesh axes of the
(data, fsdp, tensor) mesh. This is the only place where layout decisions live: a layout
experiment changes the rules (`MeshConfig.rules`, settable from YAML and `--mesh.rules=`) or the
mesh shape, never the model code. The parameters' logical axes are declared in
jsdr/model/params.py and carried by the Flax model as `nn.LogicallyPartitioned` metadata.

Names are resolved with Flax's `nn.logical_to_mesh_axes` (a name's mesh axes are taken only when
none of them is already used by an earlier dimension). Before that, a mesh axis is dropped for one
dimension when it does not divide that dimension (for example 2 KV heads on a tensor axis of 8),
and a mesh axis of size 1 is ignored; the array is then replicated along it, which is always
correct, only less memory efficient.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
import yaml
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jsdr.config import ConfigError, check, field

MESH_AXES = ("data", "fsdp", "tensor")

Rules = dict[str, tuple[str, ...] | None]

# logical name -> mesh axes (tuple) or None (replicated)
DEFAULT_RULES: Rules = {
    # parameters (see jsdr/model/params.py)
    "layers": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),  # flattened num_heads * head_dim
    "kv_heads": ("tensor",),  # flattened num_kv_heads * head_dim
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "lora_rank": ("fsdp",),  # LoRA B [L, r, out] shards its rank where its out axis is not fsdp-sharded
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


def _rule_overrides(value: Any) -> Rules:
    """Checked rule overrides: {logical name: [mesh axes] | null}, given as a mapping or as its YAML
    text (`--mesh.rules='{embed: null, mlp: [tensor, fsdp]}'`). Errors name the unknown names."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"rules: not a YAML mapping ({' '.join(str(e).split())})", key="rules",
                              detail="not a YAML mapping") from None
        value = value or {}
    check(isinstance(value, dict), "rules", f"expected a mapping of logical axis name -> list of mesh axes or "
                                            f"null, got {value!r}")
    unknown = [k for k in value if k not in DEFAULT_RULES]
    check(not unknown, "rules", f"unknown logical axis name{'s' if len(unknown) > 1 else ''} {unknown}; "
                                f"known: {list(DEFAULT_RULES)}")
    out: Rules = {}
    for name, axes in value.items():
        if axes is not None:
            axes = (axes,) if isinstance(axes, str) else axes
            check(isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes), "rules",
                  f"{name}: expected a list of mesh axes or null, got {axes!r}")
            bad = [a for a in axes if a not in MESH_AXES]
            check(not bad, "rules", f"{name}: unknown mesh axis {bad}; the mesh axes are {list(MESH_AXES)}")
            check(len(set(axes)) == len(axes), "rules", f"{name}: a mesh axis is listed twice in {list(axes)}")
            axes = tuple(axes) or None
        out[name] = axes
    return out


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The (data, fsdp, tensor) device mesh and the logical-axis rules. -1 in one axis means "all
    remaining devices"."""

    data: int = field(1, "data-parallel axis size (base weights replicated along it)")
    fsdp: int = field(-1, "fully-sharded data-parallel axis size (-1 = all remaining devices)")
    tensor: int = field(1, "tensor-parallel axis size")
    num_devices: int | None = field(None, "use only the first N devices (None = all)")
    rules: dict | None = field(None, "overrides of the logical-axis rules, a mapping {logical name: [mesh axes] or "
                                    "null} (YAML, or its text on the command line: --mesh.rules='{embed: null, mlp: "
                                    "[tensor]}'); defaults: jsdr.sharding.DEFAULT_RULES")

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            check(not isinstance(size, bool) and isinstance(size, (int, np.integer)) and (size > 0 or size == -1),
                  name, f"must be a positive size or -1 (got {size!r})")
        fill = [name for name, size in sizes.items() if size == -1]
        check(len(fill) <= 1, fill[-1] if fill else "data",
              f"at most one axis may be -1 (fill); got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}")
        check(self.num_devices is None or (isinstance(self.num_devices, int) and self.num_devices > 0),
              "num_devices", f"must be > 0 or None (got {self.num_devices!r})")
        if self.rules is not None:
            object.__setattr__(self, "rules", {k: None if v is None else list(v)
                                               for k, v in _rule_overrides(self.rules).items()})

    def resolve(self, n_devices: int) -> tuple[int, int, int]:
        """The axis sizes on `n_devices` devices (the -1 axis filled in)."""
        dims = [self.data, self.fsdp, self.tensor]
        known = math.prod(d for d in dims if d != -1)
        if -1 in dims:
            check(n_devices % known == 0, "mesh", f"(data={self.data}, fsdp={self.fsdp}, tensor={self.tensor}): "
                                                  f"the fixed axes ({known} devices) do not divide the {n_devices} "
                                                  f"available devices")
            dims[dims.index(-1)] = n_devices // known
        check(math.prod(dims) == n_devices, "mesh",
              f"(data={dims[0]}, fsdp={dims[1]}, tensor={dims[2]}) uses {math.prod(dims)} devices but {n_devices} "
              f"are available; the product of the axes must equal the device count (use -1 for one axis to fill)")
        return tuple(dims)  # type: ignore[return-value]


def effective_rules(config: MeshConfig | None = None) -> Rules:
    """DEFAULT_RULES with the overrides of `config.rules` applied."""
    rules = dict(DEFAULT_RULES)
    if config is not None and config.rules:
        rules.update(_rule_overrides(config.rules))
    return rules


def make_mesh(config: MeshConfig | Sequence[int] = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes, or
    the first `config.num_devices` of them)."""
    if not isinstance(config, MeshConfig):
        config = MeshConfig(*config)
    if devices is None:
        devices = jax.devices()
        if config.num_devices is not None:
            check(config.num_devices <= len(devices), "mesh.num_devices",
                  f"{config.num_devices} devices asked for, but only {len(devices)} are available")
            devices = _first_devices(devices, config.num_devices)
    devices = list(devices)
    shape = config.resolve(len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except Exception:  # topologies make_mesh cannot lay out: plain row-major order
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _first_devices(devices: list, n: int) -> list:
    """The first n devices; with several processes the first n / processes of each (every process
    must hold part of the mesh: it runs the same programs)."""
    procs = sorted({d.process_index for d in devices})
    if len(procs) == 1:
        return devices[:n]
    check(n % len(procs) == 0, "mesh.num_devices",
          f"{n} devices do not split over the {len(procs)} processes of this run (every process takes an equal "
          f"share); pass a multiple of {len(procs)}, or --mesh.num_devices=null for all {len(devices)}")
    per = n // len(procs)
    return [d for p in procs for d in [d for d in devices if d.process_index == p][:per]]


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
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"no sharding rule for logical axis {unknown[0]!r}; known: {sorted(rules)}")
    # per dimension, the rule of its name restricted to mesh axes (> 1) whose product divides it
    flax_rules = []
    for i, name in enumerate(names):
        if name is None:
            continue
        axes = list(rules[name] or ())
        if mesh is not None:
            axes = [a for a in axes if mesh.shape[a] > 1]
            if shape is not None:  # in order, each axis that still divides the dimension
                kept, prod = [], 1
                for a in axes:
                    if shape[i] % (prod * mesh.shape[a]) == 0:
                        kept.append(a)
                        prod *= mesh.shape[a]
                axes = kept
        flax_rules.append((name, None if not axes else axes[0] if len(axes) == 1 else tuple(axes)))
    return nn.logical_to_mesh_axes(tuple(names), flax_rules)


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
