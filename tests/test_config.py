import pytest

from dataengine.config import ConfigError, load_config


def test_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[engine]\nnum_cpus = 2\n[ingest]\nkey_prefix = "a-"\n[sceneworld]\nseed = 7\n')
    cfg = load_config(f, ingest=dict(key_prefix="b-", split=None))
    assert cfg.engine.num_cpus == 2
    assert cfg.ingest.key_prefix == "b-", "a flag overrides the file"
    assert cfg.ingest.split is None
    assert cfg.sceneworld == {"seed": 7}


def test_missing_optional_file_gives_defaults(tmp_path):
    cfg = load_config(tmp_path / "absent.toml", optional=True)
    assert cfg.ingest.use_ray is True and cfg.engine.ray_address is None


def test_a_named_config_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="absent.toml: no such config file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize("text,needle", [
    ("[ingest]\nkey_prefx = 'x'\n", "key_prefx"),
    ("[engin]\nnum_cpus = 1\n", "engin"),
    ("[engine\n", "c.toml"),
])
def test_bad_config_names_the_problem(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(f)
