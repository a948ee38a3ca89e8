"""The mesh configuration and the logical-axis rules: validation, overrides from YAML and the command
line, and how logical names become PartitionSpecs (Flax's rules plus our divisibility drop)."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jsdr import config, sharding
from jsdr.config import ConfigError
from jsdr.model import lora as lora_lib
from jsdr.model import transformer


@dataclasses.dataclass(frozen=True)
class _Run:  # a stand-in for the train/eval configs, which nest a MeshConfig as `mesh`
    mesh: sharding.MeshConfig = config.field(sharding.MeshConfig(), "")


def test_mesh_config_fields_have_help_and_defaults():
    m = sharding.MeshConfig()
    assert (m.data, m.fsdp, m.tensor, m.num_devices, m.rules) == (1, -1, 1, None, None)
    for f in dataclasses.fields(sharding.MeshConfig):
        assert f.metadata.get("help"), f.name
    assert sharding.MeshConfig(2, 2, 2).resolve(8) == (2, 2, 2)  # positional order kept
    assert sharding.MeshConfig(2, -1, 1).resolve(8) == (2, 4, 1)


@pytest.mark.parametrize("kw, match", [
    (dict(data=0), r"data: must be a positive size or -1 \(got 0\)"),
    (dict(tensor=-2), r"tensor: must be a positive size or -1"),
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(num_devices=0), r"num_devices: must be > 0 or None"),
    (dict(rules={"embd": None, "mlpp": ["tensor"]}), r"rules: unknown logical axis names \['embd', 'mlpp'\]"),
    (dict(rules={"mlp": ["tensr"]}), r"rules: mlp: unknown mesh axis \['tensr'\]"),
    (dict(rules={"mlp": ["tensor", "tensor"]}), "listed twice"),
    (dict(rules={"mlp": 3}), "expected a list of mesh axes or null"),
    (dict(rules=["mlp"]), "expected a mapping"),
])
def test_mesh_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        sharding.MeshConfig(**kw)


def test_rules_from_yaml_and_command_line(tmp_path):
    yml = tmp_path / "run.yaml"
    yml.write_text("mesh:\n  tensor: 2\n  rules:\n    embed: null\n    mlp: [tensor, fsdp]\n")
    from_yaml = config.load(_Run, yml).mesh
    from_cli = config.load(_Run, overrides=["--mesh.tensor=2", "--mesh.rules={embed: null, mlp: [tensor, fsdp]}"]).mesh
    assert from_yaml == from_cli
    assert from_yaml.rules == {"embed": None, "mlp": ["tensor", "fsdp"]}
    rules = sharding.effective_rules(from_cli)
    assert rules["embed"] is None and rules["mlp"] == ("tensor", "fsdp")
    assert {k: v for k, v in rules.items() if k not in ("embed", "mlp")} == \
        {k: v for k, v in sharding.DEFAULT_RULES.items() if k not in ("embed", "mlp")}
    assert sharding.effective_rules(sharding.MeshConfig()) == sharding.DEFAULT_RULES
    assert config.to_dict(from_yaml)["rules"] == {"embed": None, "mlp": ["tensor", "fsdp"]}  # YAML round trip
    with pytest.raises(ConfigError, match=r"mesh\.rules: unknown logical axis name \['embd'\]"):
        config.load(_Run, overrides=["--mesh.rules={embd: [fsdp]}"])
    with pytest.raises(ConfigError, match=r"mesh\.data: must be a positive size"):
        config.load(_Run, overrides=["--mesh.data=0"])


def test_make_mesh_num_devices_and_errors():
    m = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1, tensor=2, num_devices=4))
    assert dict(m.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="16 devices asked for, but only 8"):
        sharding.make_mesh(sharding.MeshConfig(num_devices=16))
    with pytest.raises(ValueError, match="product of the axes must equal the device count"):
        sharding.make_mesh(sharding.MeshConfig(3, 1, 1))


def test_logical_to_spec_drops_axes_that_do_not_divide_and_size_one_axes():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    spec = sharding.logical_to_spec
    assert spec(("embed", "q_heads"), (64, 32), mesh) == P("fsdp", "tensor")
    assert spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)  # 3 kv columns: tensor dropped
    assert spec(("act_batch", "act_seq"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert spec(("act_batch", "act_seq"), (2, 5), mesh) == P("data", None)  # fsdp would not divide 2
    assert spec(("act_batch",), (3,), mesh) == P(None)
    assert spec(("act_batch", None), None, mesh) == P(("data", "fsdp"), None)
    flat = sharding.make_mesh(sharding.MeshConfig(1, 8, 1))
    assert spec(("act_batch", "mlp"), (8, 16), flat) == P("fsdp", None)  # data and tensor have size 1
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'bogus'"):
        spec(("embed", "bogus"), (4, 4), mesh)


def test_logical_to_spec_a_mesh_axis_shards_one_dimension_only():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    rules = dict(sharding.DEFAULT_RULES, act_seq=("tensor",))
    # act_seq and vocab both ask for tensor: the earlier dimension gets it
    assert sharding.logical_to_spec(("act_seq", "vocab"), (8, 8), mesh, rules) == P("tensor", None)
    # ... unless it does not divide that dimension; then the next one takes it
    assert sharding.logical_to_spec(("act_seq", "vocab"), (7, 8), mesh, rules) == P(None, "tensor")
    # a name whose mesh axes are partly taken gets none of them (Flax's rule semantics)
    assert sharding.logical_to_spec(("embed", "act_batch"), (8, 8), mesh) == P("fsdp", None)


def test_rule_overrides_change_parameter_and_lora_shardings():
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 4, 2))
    cfg = transformer.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=2, head_dim=8)
    rules = sharding.effective_rules(sharding.MeshConfig(1, 4, 2, rules={"embed": None, "mlp": ["tensor", "fsdp"]}))
    axes, shapes = transformer.param_axes(cfg), transformer.param_shapes(cfg)
    default = sharding.tree_shardings(axes, shapes, mesh)
    changed = sharding.tree_shardings(axes, shapes, mesh, rules)
    up = ("layers", "mlp", "up_proj", "kernel")

    def at(tree, path):
        for k in path:
            tree = tree[k]
        return tree.spec
    assert at(default, up) == P(None, "fsdp", "tensor")
    assert at(changed, up) == P(None, None, ("tensor", "fsdp"))
    lc = lora_lib.LoraConfig(rank=4, target_modules=("up_proj",))
    lora_specs = lora_lib.lora_shardings(cfg, lc, mesh, rules)["layers"]["mlp"]["up_proj"]
    # embed unsharded: A's rank takes fsdp; B's rank takes fsdp first, and its mlp axis, whose rule
    # (tensor, fsdp) is then partly taken, gets none
    assert lora_specs["lora_a"].spec == P(None, None, "fsdp")
    assert lora_specs["lora_b"].spec == P(None, "fsdp", None)


def test_constrain_is_identity_without_mesh_and_shards_under_use_mesh():
    x = np.arange(16.0).reshape(8, 2)
    assert sharding.constrain(x, ("act_batch", None)) is x
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 4, 1))
    with sharding.use_mesh(mesh):
        y = jax.jit(lambda a: sharding.constrain(a * 1, ("act_batch", None)))(x)
    assert y.sharding.spec[0] == ("data", "fsdp") and tuple(y.sharding.spec[1:]) in ((), (None,))
