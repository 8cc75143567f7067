import pytest

from dalign.config import ConfigError, config_hash, diff_keys, load_config, parse_overrides, to_yaml


def test_defaults_are_paper_values():
    cfg = load_config()
    assert (cfg.sample.n, cfg.sample.temperature, cfg.sample.top_p) == (8, 0.7, 1.0)
    assert (cfg.sft.lora.r, cfg.sft.lora.alpha, cfg.sft.learning_rate) == (32, 64, 1.41e-5)
    assert cfg.score.layers == [12] and cfg.grpo.beta == 0.0


def test_every_field_has_help():
    from pydantic import BaseModel

    from dalign.config import RunConfig

    def walk(model: type[BaseModel]):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no help string"
            ann = f.annotation
            for t in (ann, *getattr(ann, "__args__", ())):
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)

    walk(RunConfig)


def test_unknown_key_is_named_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sample:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "sample.temprature" in str(e.value) and "temperature" in str(e.value) and str(p) in str(e.value)


def test_unknown_key_inside_dataset_list(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("sample:\n  datasets:\n    - {name: advbench, limti: 3}\n")
    with pytest.raises(ConfigError, match="limit"):
        load_config(p)


@pytest.mark.parametrize(
    "override,msg", [("sample.n=0", "n must be >= 1"), ("sample.temperature=-1", ">= 0")]
)
def test_bad_sampling_values(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(overrides=[override])


def test_overrides_and_yaml_roundtrip(tmp_path):
    cfg = load_config(overrides=["sample.n=4", "score.layers=all", "name=x"])
    assert cfg.sample.n == 4 and cfg.score.layers == "all" and cfg.name == "x"
    p = tmp_path / "r.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["sample.n"])


def test_hash_and_diff():
    a = {"sample": {"n": 8, "t": 0.7}, "model": {"x": 1}}
    b = {"sample": {"n": 4, "t": 0.7}, "model": {"x": 1}}
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash({"model": {"x": 1}, "sample": {"t": 0.7, "n": 8}})
    assert diff_keys(a, b) == ["sample.n"]


def test_unknown_stage():
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(overrides={"stages": ["sample", "smaple"]})
