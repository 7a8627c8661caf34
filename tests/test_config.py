"""Source configs (``include/sources/*.yaml``): loading, validation errors, bucket resolution.

Contract facts used here: B's ``limit`` is 1..1000 and B allows about 20 requests per
second per key (``shared/contracts/source-b/README.md``); ``'a'`` is A's own
``source_system`` (``a-model.md``). Errors must name the file and the field.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from medsync.config import (
    SourceConfig,
    StorageConfig,
    include_dir,
    load_source_config,
    load_source_configs,
)
from medsync.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "include"
B_YAML = INCLUDE / "sources" / "b.yaml"


def _b_raw() -> dict[str, Any]:
    raw = yaml.safe_load(B_YAML.read_text(encoding="utf-8"))
    assert isinstance(raw, dict)
    return raw


def _write(directory: Path, file_stem: str, raw: dict[str, Any]) -> Path:
    path = directory / f"{file_stem}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _variables(values: dict[str, str | None]) -> Callable[[str], str | None]:
    return values.get


def _no_variables(name: str) -> str | None:
    raise AssertionError(f"Variable {name!r} must not be looked up")


def _storage(**overrides: Any) -> StorageConfig:
    fields: dict[str, Any] = {"aws_conn_id": "aws_b", "bucket": "b-default-bucket"}
    fields.update(overrides)
    return StorageConfig(**fields)


# --- b.yaml ---------------------------------------------------------------------------------


def test_b_yaml_loads_as_source_b() -> None:
    config = load_source_config(B_YAML)
    assert isinstance(config, SourceConfig)
    assert config.name == "b"
    assert config.protocol == "rest"
    assert config.dag_id == "medsync_b"
    assert config.mapping_path.is_file()


def test_b_yaml_page_size_is_within_bs_limit_range() -> None:
    # README: "`limit` is 1..1000 (default 100). Any other value is answered 400."
    assert 1 <= load_source_config(B_YAML).page_size <= 1000


def test_b_yaml_rate_limit_stays_below_what_b_allows_per_key() -> None:
    # README: "B allows about 20 requests per second per key."
    assert load_source_config(B_YAML).rate_limit_per_second < 20


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return {str(k) for k in node} | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()


def test_b_yaml_has_no_secrets_only_connection_ids() -> None:
    keys = {k.lower() for k in _keys(_b_raw())}
    assert not {k for k in keys if any(w in k for w in ("password", "api_key", "secret", "token", "access_key"))}
    assert load_source_config(B_YAML).connections.api_conn_id


def test_load_source_configs_default_directory_finds_b() -> None:
    assert [c.name for c in load_source_configs()] == sorted(p.stem for p in (INCLUDE / "sources").glob("*.yaml"))
    assert "b" in [c.name for c in load_source_configs()]


# --- bad configs: ConfigError naming the file and the field -------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"unexpected_key": 1}, "unexpected_key"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 1001}, "page_size"),
        ({"storage": {"aws_conn_id": "x", "bucket": "b-bucket", "typo_bucket": "y"}}, "typo_bucket"),
        ({"protocol": "smoke_signals"}, "protocol"),
        ({"instance_slices": 0}, "instance_slices"),
    ],
)
def test_invalid_field_raises_config_error_naming_file_and_field(
    tmp_path: Path, overrides: dict[str, Any], field: str
) -> None:
    path = _write(tmp_path, "b", {**_b_raw(), **overrides})
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert field in str(caught.value)


def test_name_a_is_refused_because_it_is_service_as_own_source_system(tmp_path: Path) -> None:
    path = _write(tmp_path, "a", {**_b_raw(), "name": "a"})
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert "name" in str(caught.value)


@pytest.mark.parametrize("name", ["B", "1b", "", "b-c", "a_name_that_is_far_too_long"])
def test_name_that_is_not_a_short_lowercase_identifier_is_refused(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name or "empty", {**_b_raw(), "name": name})
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert "name" in str(caught.value)


def test_file_name_must_match_source_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "c", _b_raw())  # name: b in c.yaml
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert "name" in str(caught.value)


def test_bad_yaml_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("name: b\n  protocol: [rest\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)


def test_yaml_that_is_not_a_mapping_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("- name: b\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)


def test_missing_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)


def test_invalid_cron_raises_config_error_naming_file_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "b", {**_b_raw(), "schedule": {"cron": "not a cron", "timezone": "Asia/Seoul"}})
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert "cron" in str(caught.value)


def test_invalid_timezone_raises_config_error_naming_file_and_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "b", {**_b_raw(), "schedule": {"cron": "0 0,12 * * *", "timezone": "Mars/Base"}})
    with pytest.raises(ConfigError) as caught:
        load_source_config(path)
    assert str(path) in str(caught.value)
    assert "timezone" in str(caught.value)


def test_one_bad_config_in_the_directory_fails_loading_naming_that_file(tmp_path: Path) -> None:
    _write(tmp_path, "b", _b_raw())
    bad = _write(tmp_path, "c", {**_b_raw(), "name": "c", "page_size": 0})
    with pytest.raises(ConfigError) as caught:
        load_source_configs(tmp_path)
    assert str(bad) in str(caught.value)


# --- buckets ------------------------------------------------------------------------------------


def test_resolve_bucket_without_variable_configured_is_the_file_bucket() -> None:
    assert _storage().resolve_bucket(_no_variables) == "b-default-bucket"


def test_resolve_bucket_uses_the_variable_when_set() -> None:
    storage = _storage(bucket_variable="medsync_b_bucket")
    assert storage.resolve_bucket(_variables({"medsync_b_bucket": "b-imaging-prod"})) == "b-imaging-prod"


def test_resolve_bucket_strips_whitespace_from_the_variable() -> None:
    storage = _storage(bucket_variable="medsync_b_bucket")
    assert storage.resolve_bucket(_variables({"medsync_b_bucket": "  b-imaging-prod\n"})) == "b-imaging-prod"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_resolve_bucket_falls_back_to_the_file_when_variable_unset_or_blank(value: str | None) -> None:
    storage = _storage(bucket_variable="medsync_b_bucket")
    assert storage.resolve_bucket(_variables({"medsync_b_bucket": value})) == "b-default-bucket"


def test_b_yaml_bucket_is_overridable_per_environment() -> None:
    storage = load_source_config(B_YAML).storage
    assert storage.bucket_variable
    assert storage.resolve_bucket(_variables({storage.bucket_variable: "b-imaging-stage"})) == "b-imaging-stage"
    assert storage.resolve_bucket(_variables({})) == storage.bucket


def test_allowed_buckets_from_the_variable_list_plus_the_resolved_bucket() -> None:
    storage = _storage(
        bucket_variable="medsync_b_bucket",
        allowed_buckets=("from-file",),
        allowed_buckets_variable="medsync_b_allowed",
    )
    get = _variables({"medsync_b_bucket": "b-prod", "medsync_b_allowed": " old-b , b-archive,, "})
    assert storage.resolve_allowed_buckets(get) == frozenset({"b-prod", "old-b", "b-archive"})


def test_allowed_buckets_variable_unset_keeps_the_files_list() -> None:
    storage = _storage(allowed_buckets=("from-file",), allowed_buckets_variable="medsync_b_allowed")
    assert storage.resolve_allowed_buckets(_variables({})) == frozenset({"b-default-bucket", "from-file"})


def test_allowed_buckets_variable_empty_replaces_the_list_with_nothing() -> None:
    storage = _storage(allowed_buckets=("from-file",), allowed_buckets_variable="medsync_b_allowed")
    assert storage.resolve_allowed_buckets(_variables({"medsync_b_allowed": ""})) == frozenset({"b-default-bucket"})


def test_allowed_buckets_without_any_variable_configured() -> None:
    storage = _storage(allowed_buckets=("x-bucket",))
    assert storage.resolve_allowed_buckets(_no_variables) == frozenset({"b-default-bucket", "x-bucket"})


# --- MEDSYNC_INCLUDE_DIR --------------------------------------------------------------------------


def test_include_dir_override_finds_a_second_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    include = tmp_path / "include"
    shutil.copytree(INCLUDE, include)
    _write(include / "sources", "d", {**_b_raw(), "name": "d", "mapping_file": None})
    shutil.copy(INCLUDE / "mappings" / "b.yaml", include / "mappings" / "d.yaml")
    monkeypatch.setenv("MEDSYNC_INCLUDE_DIR", str(include))

    configs = load_source_configs()

    assert include_dir() == include
    repo_sources = sorted(p.stem for p in (INCLUDE / "sources").glob("*.yaml"))
    assert [c.name for c in configs] == sorted([*repo_sources, "d"])
    c = next(c for c in configs if c.name == "d")
    assert c.dag_id == "medsync_d"
    assert c.mapping_path == include / "mappings" / "d.yaml"
    assert c.mapping_path.is_file()


def test_mapping_file_defaults_to_the_source_name(tmp_path: Path) -> None:
    raw = {**_b_raw(), "name": "c"}
    raw.pop("mapping_file")
    assert load_source_config(_write(tmp_path, "c", raw)).mapping_file == "c.yaml"
