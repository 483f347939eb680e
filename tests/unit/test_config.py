import pytest

from rankscope.config import PRESETS, parse_overrides
from rankscope.methods import describe_fields, load_config
from rankscope.core.errors import ConfigError


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: mini}\ntrain: {lr: 1.0e-3, max_steps: 50}\n")
    cfg = load_config(path, ["train.lr=5e-4", "model.n_layers=3", "data.sources=[python]"])
    assert cfg.model.d_model == PRESETS["mini"]["d_model"] and cfg.model.n_layers == 3
    assert cfg.train.lr == 5e-4 and cfg.train.max_steps == 50 and cfg.data.sources == ["python"]


def test_base_config_is_inherited(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {lr: 0.01, max_steps: 40}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain: {max_steps: 80}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 80


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; valid keys here: seed"),
        (["nonsense.x=1"], "unknown config key 'nonsense'"),
        (["train.lr=fast"], "'train.lr' must be float"),
        (["train.max_steps=1.5"], "'train.max_steps' must be int"),
        (["train.precision=fp16"], "one of 'auto', 'fp32', 'bf16'"),
        (["model.n_heads=5"], "must divide model.d_model"),
        (["model.n_kv_heads=3"], "must divide model.n_heads"),
        (["model.preset=giant"], "unknown model.preset 'giant'; valid presets: pico-tiny"),
        (["train.seq_len=4096"], "exceeds model.max_seq_len"),
        (["train.lr=-1"], "train.lr must be positive"),
        (["train.warmup_steps=1000", "train.max_steps=10"], "warmup_steps"),
        (["oops"], "must look like section.key=value"),
        (["method.lora.dropout=1.5"], "method.dropout"),
        (["train.parallel=fsdp", "method.name=galore"], "not 'galore'; use train.parallel=ddp"),
        (["train.parallel=fsdp", "method.name=relora", "method.relora.warm_start_steps=5"], "does not support a ReLoRA warm start"),
        (["train.parallel=zero3"], "one of 'ddp', 'fsdp'"),
    ],
)
def test_bad_values_raise_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_override_values_parse_as_yaml():
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=true", "e=null"]) == {"a": {"b": 1, "c": ["x", "y"]}, "d": True, "e": None}


def test_every_field_documented():
    rows = describe_fields()
    assert len(rows) > 40
    assert all(help for _, _, _, help in rows), [name for name, _, _, help in rows if not help]


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_the_config_imports_no_method_and_no_torch():
    """The schema sits below the methods: `rankscope.methods` resolves `method.<name>` against its registry."""
    import subprocess
    import sys

    code = ("import sys\nimport rankscope.config, rankscope.presets\n"
            "assert not [m for m in sys.modules if m.startswith('rankscope.methods') or m == 'torch'], sorted(sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
