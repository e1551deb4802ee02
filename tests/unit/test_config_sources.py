"""Config fields for where model files come from: `url`, `sha256`, and the disk/copy knobs;
the shipped example configs stay valid."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config, parse_config


@pytest.mark.parametrize("path", ["configs/example.yaml", "deploy/config.example.yaml"])
def test_shipped_example_configs_are_valid(path):
    assert load_config(path).models


def model(**fields) -> dict:
    return {"models": [{"name": "m", **fields}]}


@pytest.mark.parametrize(
    "fields, field_error",
    [
        ({"url": "ftp://host/m.gguf"}, "models[0].url: 'ftp://host/m.gguf': unsupported scheme 'ftp'"),
        ({"url": "hf://just-a-repo"}, "models[0].url: 'hf://just-a-repo': expected hf://OWNER/REPO/FILE.gguf"),
        ({"path": "m.gguf", "sha256": "abc"}, "models[0].sha256: must be 64 hexadecimal digits"),
        ({}, "models[0]: needs `path` (a GGUF file), `url` (where to download it) or `catalog`"),
    ],
)
def test_a_bad_source_is_an_error_naming_the_field(fields, field_error):
    with pytest.raises(ConfigError) as err:
        parse_config(model(**fields))
    assert field_error in str(err.value)


def test_a_url_alone_is_a_source_and_names_the_stored_file():
    m = parse_config(model(url="hf://bartowski/Some-GGUF/Some-Q4_K_M.gguf@main")).models[0]
    assert m.file_name == "Some-Q4_K_M.gguf"


def test_the_stored_name_comes_from_path_before_url():
    m = parse_config(model(path="/models/x/mine.gguf", url="https://example.org/other.gguf")).models[0]
    assert m.file_name == "mine.gguf"


def test_sha256_pin_is_normalised_to_lowercase_hex():
    m = parse_config(model(path="m.gguf", sha256="SHA256:" + "AB" * 32)).models[0]
    assert m.sha256 == "ab" * 32


def test_disk_and_copy_settings_have_their_defaults():
    cluster = parse_config({}).cluster
    assert (cluster.keep_free_disk_gib, cluster.copy_rate_limit_mib_s, cluster.copy_attempts) == (2.0, None, 3)
