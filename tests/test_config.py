import pytest

from carp_fast.config import (
    CONFIG_DIR, Config, ConfigError, dump_config, field_docs, load_config, parse_overrides,
)


def test_recipes_load_and_state_their_batch():
    for name in ("fast_400ep", "fast_200ep", "fast_100ep", "fast_400ep_2x224", "demo_cpu"):
        cfg = load_config(f"{name}.yaml")
        assert isinstance(cfg, Config)
    cfg = load_config("fast_400ep.yaml")
    assert (cfg.crops.global_number, cfg.crops.global_size) == (2, 224)
    assert (cfg.crops.local_number, cfg.crops.local_size) == (6, 96)
    assert (cfg.model.num_prototypes, cfg.model.partition_size) == (65536, 512)
    assert cfg.train.epochs == 400
    assert load_config("fast_400ep_2x224").crops.local_number == 0
    text = (CONFIG_DIR / "fast_400ep.yaml").read_text()
    assert "global batch" in text


def test_overrides_are_read_as_yaml():
    cfg = load_config("demo_cpu.yaml", ["crops.global_scale=[0.25,1.0]", "train.amp=bf16",
                                        "train.max_steps=5", "data.num_workers=0"])
    assert cfg.crops.global_scale == (0.25, 1.0)
    assert cfg.train.amp == "bf16"
    assert cfg.train.max_steps == 5
    assert cfg.data.num_workers == 0


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean 'train\.epochs'"):
        load_config("demo_cpu.yaml", ["train.epoch=3"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'.*'train'"):
        load_config("demo_cpu.yaml", ["trian.epochs=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=ten", "train.epochs: expected an integer"),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of"),
        ("crops.global_scale=0.5", "expected a list of 2"),
        ("data.pin_memory=3", "expected true or false"),
        ("model.arch=resnet51", "did you mean 'resnet50'"),
        ("model.partition_size=0", "must be positive"),
        ("crops.local_scale=[0.5,0.1]", "low <= high"),
        ("train", "section.key=value"),
        ("data.backend=ffcv", "data.generate_demo writes an ImageFolder tree"),  # demo sets it
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo_cpu.yaml", [override])


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(ConfigError, match="neither a file nor a recipe"):
        load_config("fast_4000ep.yaml")


def test_yaml_file_with_unknown_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  archh: resnet18\n")
    with pytest.raises(ConfigError, match="model.archh"):
        load_config(path)


def test_dump_round_trips(tmp_path):
    cfg = load_config("demo_cpu.yaml", ["train.seed=4"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_every_field_has_a_docstring():
    rows = field_docs()
    keys = [row[0] for row in rows]
    for required in ("data.backend", "data.path", "data.batch_size", "data.num_workers",
                     "crops.global_number", "crops.local_scale", "model.arch",
                     "model.num_prototypes", "model.partition_size", "train.epochs",
                     "train.max_steps", "train.seed", "train.out_dir", "train.amp",
                     "train.loss_impl"):
        assert required in keys
    assert all(doc for _, _, _, doc in rows), [k for k, _, _, d in rows if not d]


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_readme_config_reference_is_current():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "tools/config_reference.py", "--check"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
