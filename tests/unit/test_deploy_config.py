"""The per-pool scaling config: the shipped examples load, and bad configs
fail before anything starts, naming the field and the fix."""

from __future__ import annotations

import pytest

from deploy.config import ConfigError, load_config
from tests.configs import BAD, EXAMPLES, with_, write


def test_the_examples_load():
    assert len(EXAMPLES) >= 2
    for path in EXAMPLES:
        config = load_config(path)
        assert config.pools.prefill is not None and config.pools.decode is not None
        assert config.pools.decode.autoscaling.signal in ("kv_cache_usage", "waiting_requests")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configs_name_the_field(tmp_path, case):
    config, words = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, config))
    for word in words:
        assert word in str(info.value), (case, str(info.value))


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_the_api_key_can_come_from_the_environment(tmp_path, monkeypatch):
    config = load_config(write(tmp_path, with_(lambda c: c["router"].update(api_key_env="SS_KEY"))))
    monkeypatch.delenv("SS_KEY", raising=False)
    with pytest.raises(ValueError, match="SS_KEY is not set"):
        _ = config.router.resolved_api_key
    monkeypatch.setenv("SS_KEY", "s3cret")
    assert config.router.resolved_api_key == "s3cret"
