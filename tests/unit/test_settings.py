"""batchsvc.settings.Settings.from_env: every variable, its coercion, its default and its error."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchsvc.errors import ConfigError
from batchsvc.settings import DEFAULT_CONFIG, RateLimit, RedisSentinel, Settings, StorageURL


def test_defaults_with_an_empty_environment() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url is None
    assert settings.redis_sentinel is None  # neither: the embedded Redis
    assert settings.data_dir == Path("var").absolute()
    assert settings.data_dir.is_absolute()
    assert settings.config_path == DEFAULT_CONFIG
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.worker_models is None
    assert settings.worker_concurrency == 8
    assert settings.batch_nice == 10
    assert settings.worker_processes is None
    assert settings.require_project_header is True
    assert settings.visibility_timeout_s == 300.0
    assert settings.lease_ttl_s == 30.0
    assert settings.sweep_interval_s == 30.0
    assert settings.stuck_after_s == 60.0
    assert settings.completion_window_s == 86_400
    assert settings.file_retention_s == 2_592_000
    assert settings.batch_retention_s == 2_592_000
    assert settings.rate_limit == RateLimit(requests=6000, period_s=60)
    assert settings.max_active_batches == 100
    assert settings.max_queued_lines == 500_000
    assert settings.max_body_bytes == 1_048_576
    assert settings.storage_url == StorageURL()  # local files...
    assert settings.storage_root == settings.data_dir / "files"  # ...under the data dir
    assert settings.redis_dir == settings.data_dir / "redis"


def test_the_dataclass_defaults_match_the_environment_defaults() -> None:
    from_env = Settings.from_env({})
    plain = Settings()
    assert from_env.with_overrides(data_dir=plain.data_dir) == plain


def test_every_variable_is_read_and_coerced(tmp_path: Path) -> None:
    env = {
        "REDIS_URL": "redis://example:6379/3",
        "BATCHSVC_DATA_DIR": str(tmp_path / "data"),
        "BATCHSVC_CONFIG": str(tmp_path / "models.toml"),
        "PORT": "9123",
        "BATCHSVC_HOST": "0.0.0.0",
        "MODELS": " a/b:c.d , demo-echo,,",
        "CONCURRENCY": "32",
        "BATCHSVC_BATCH_NICE": "0",
        "WORKER_PROCESSES": "3",
        "BATCHSVC_REQUIRE_PROJECT_HEADER": "off",
        "BATCHSVC_VISIBILITY_TIMEOUT_S": "45.5",
        "BATCHSVC_LEASE_TTL_S": "12",
        "BATCHSVC_SWEEP_INTERVAL_S": "0.5",
        "BATCHSVC_STUCK_AFTER_S": "0",
        "BATCHSVC_COMPLETION_WINDOW_S": "120",
        "BATCHSVC_FILE_RETENTION_S": "3600",
        "BATCHSVC_BATCH_RETENTION_S": "60",
        "BATCHSVC_RATE_LIMIT": "20/Second",
        "BATCHSVC_MAX_ACTIVE_BATCHES": "0",
        "BATCHSVC_MAX_QUEUED_LINES": "7",
        "BATCHSVC_MAX_BODY_BYTES": "4096",
        "BATCHSVC_STORAGE_URL": "s3://bucket/batchsvc",
        "BATCHSVC_DEMO": "false",
    }
    s = Settings.from_env(env)
    assert s.redis_url == "redis://example:6379/3"
    assert s.data_dir == tmp_path / "data"
    assert s.config_path == tmp_path / "models.toml"
    assert s.port == 9123
    assert s.host == "0.0.0.0"
    assert s.worker_models == ("a/b:c.d", "demo-echo")
    assert s.worker_concurrency == 32
    assert s.batch_nice == 0
    assert s.worker_processes == 3
    assert s.require_project_header is False
    assert s.visibility_timeout_s == 45.5
    assert s.lease_ttl_s == 12.0
    assert s.sweep_interval_s == 0.5
    assert s.stuck_after_s == 0.0
    assert s.completion_window_s == 120
    assert s.file_retention_s == 3600
    assert s.batch_retention_s == 60
    assert s.rate_limit == RateLimit(requests=20, period_s=1)
    assert s.max_active_batches == 0
    assert s.max_queued_lines == 7
    assert s.max_body_bytes == 4096
    assert s.storage_url == StorageURL(bucket="bucket", prefix="batchsvc")
    assert s.demo_enabled is False


def test_a_relative_data_dir_and_home_are_made_absolute() -> None:
    s = Settings.from_env({"BATCHSVC_DATA_DIR": "~/bs", "BATCHSVC_CONFIG": "conf/models.toml"})
    assert s.data_dir == Path("~/bs").expanduser()
    assert s.config_path == Path("conf/models.toml").absolute()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert (
        Settings.from_env({"BATCHSVC_REQUIRE_PROJECT_HEADER": raw}).require_project_header
        is expected
    )


@pytest.mark.parametrize(
    "name",
    [
        "REDIS_URL",
        "REDIS_SENTINELS",
        "REDIS_MASTER_NAME",
        "REDIS_PASSWORD",
        "REDIS_SENTINEL_PASSWORD",
        "REDIS_DB",
        "BATCHSVC_DATA_DIR",
        "BATCHSVC_CONFIG",
        "PORT",
        "BATCHSVC_HOST",
        "MODELS",
        "CONCURRENCY",
        "WORKER_PROCESSES",
        "BATCHSVC_BATCH_NICE",
        "BATCHSVC_REQUIRE_PROJECT_HEADER",
        "BATCHSVC_VISIBILITY_TIMEOUT_S",
        "BATCHSVC_LEASE_TTL_S",
        "BATCHSVC_SWEEP_INTERVAL_S",
        "BATCHSVC_STUCK_AFTER_S",
        "BATCHSVC_COMPLETION_WINDOW_S",
        "BATCHSVC_FILE_RETENTION_S",
        "BATCHSVC_BATCH_RETENTION_S",
        "BATCHSVC_RATE_LIMIT",
        "BATCHSVC_MAX_ACTIVE_BATCHES",
        "BATCHSVC_MAX_QUEUED_LINES",
        "BATCHSVC_MAX_BODY_BYTES",
        "BATCHSVC_STORAGE_URL",
        "BATCHSVC_STORAGE",
    ],
)
def test_a_blank_variable_means_its_default(name: str) -> None:
    # ``NAME=`` in a .env file must not mean "false" or "0" or an error: it is unset
    assert Settings.from_env({name: ""}) == Settings.from_env({})
    assert Settings.from_env({name: "  "}) == Settings.from_env({})


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PORT", "http"),
        ("PORT", "0"),
        ("PORT", "70000"),
        ("PORT", "80.5"),
        ("CONCURRENCY", "0"),
        ("CONCURRENCY", "many"),
        ("WORKER_PROCESSES", "0"),
        ("WORKER_PROCESSES", "two"),
        ("BATCHSVC_BATCH_NICE", "-5"),
        ("BATCHSVC_BATCH_NICE", "20"),
        ("BATCHSVC_REQUIRE_PROJECT_HEADER", "maybe"),
        ("BATCHSVC_VISIBILITY_TIMEOUT_S", "0.5"),
        ("BATCHSVC_VISIBILITY_TIMEOUT_S", "soon"),
        ("BATCHSVC_LEASE_TTL_S", "0"),
        ("BATCHSVC_LEASE_TTL_S", "nan"),
        ("BATCHSVC_LEASE_TTL_S", "inf"),
        ("BATCHSVC_SWEEP_INTERVAL_S", "0.1"),
        ("BATCHSVC_SWEEP_INTERVAL_S", "-inf"),
        ("BATCHSVC_STUCK_AFTER_S", "-1"),
        ("BATCHSVC_STUCK_AFTER_S", "NaN"),
        ("BATCHSVC_COMPLETION_WINDOW_S", "0"),
        ("BATCHSVC_COMPLETION_WINDOW_S", "1.5"),
        ("BATCHSVC_FILE_RETENTION_S", "-5"),
        ("BATCHSVC_FILE_RETENTION_S", "30d"),
        ("BATCHSVC_BATCH_RETENTION_S", "0"),
        ("BATCHSVC_RATE_LIMIT", "100"),
        ("BATCHSVC_RATE_LIMIT", "0/second"),
        ("BATCHSVC_RATE_LIMIT", "-5/minute"),
        ("BATCHSVC_RATE_LIMIT", "10/day"),
        ("BATCHSVC_RATE_LIMIT", "1.5/second"),
        ("BATCHSVC_MAX_ACTIVE_BATCHES", "-1"),
        ("BATCHSVC_MAX_QUEUED_LINES", "lots"),
        ("BATCHSVC_MAX_BODY_BYTES", "100"),
        ("BATCHSVC_STORAGE", "s3"),
        ("BATCHSVC_STORAGE_URL", "s3://"),
        ("BATCHSVC_STORAGE_URL", "s3:///prefix"),
        ("BATCHSVC_STORAGE_URL", "s3://key:secret@bucket/prefix"),
        ("BATCHSVC_STORAGE_URL", "s3://bucket:9000/prefix"),
        ("BATCHSVC_STORAGE_URL", "s3://bucket/prefix?region=eu-west-1"),
        ("BATCHSVC_STORAGE_URL", "http://minio:9000/bucket"),
        ("BATCHSVC_STORAGE_URL", "gs://bucket"),
        ("BATCHSVC_STORAGE_URL", "local"),
        ("BATCHSVC_STORAGE_URL", "/srv/batchsvc/files"),
        ("BATCHSVC_STORAGE_URL", "file://srv/batchsvc/files"),
        ("BATCHSVC_STORAGE_URL", "file:relative/files"),
        ("REDIS_SENTINELS", ","),
        ("REDIS_SENTINELS", "s1:26379,s2:port"),
        ("REDIS_SENTINELS", "s1:0"),
        ("REDIS_SENTINELS", "s1:65536"),
        ("REDIS_SENTINELS", "::1:26379"),  # IPv6 goes in brackets
        ("REDIS_SENTINELS", "sentinel://s1:26379"),
        ("REDIS_SENTINELS", ":pw@s1:26379"),
        ("REDIS_SENTINELS", "s1:26379/0"),
        ("REDIS_SENTINELS", "s1 s2"),
        ("REDIS_SENTINELS", "s1:26379,s1:26379"),
        ("REDIS_SENTINELS", ":26379"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    assert name in info.value.message
    assert repr(raw) in info.value.message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("file://", StorageURL()),
        ("file:", StorageURL()),
        ("file:///srv/batchsvc/files", StorageURL(path=Path("/srv/batchsvc/files"))),
        ("FILE://localhost/srv/files/", StorageURL(path=Path("/srv/files"))),
        ("file:///srv/with%20space", StorageURL(path=Path("/srv/with space"))),
        ("s3://bucket", StorageURL(bucket="bucket")),
        ("s3://bucket/", StorageURL(bucket="bucket")),
        (
            "S3://my.bucket-1/tenant/batchsvc/",
            StorageURL(bucket="my.bucket-1", prefix="tenant/batchsvc"),
        ),
        (" s3://bucket/prefix ", StorageURL(bucket="bucket", prefix="prefix")),
    ],
)
def test_storage_urls(raw: str, expected: StorageURL) -> None:
    assert Settings.from_env({"BATCHSVC_STORAGE_URL": raw}).storage_url == expected


def test_the_storage_root_is_the_path_of_a_file_url(tmp_path: Path) -> None:
    env = {"BATCHSVC_DATA_DIR": str(tmp_path / "data")}
    assert Settings.from_env(env).storage_root == tmp_path / "data/files"
    env["BATCHSVC_STORAGE_URL"] = f"file://{tmp_path}/files"
    assert Settings.from_env(env).storage_root == tmp_path / "files"


def test_the_legacy_storage_variable_still_accepts_local() -> None:
    # BATCHSVC_STORAGE=local is in every .env copied from the old env.example: it means the
    # default and does not stand in the way of BATCHSVC_STORAGE_URL
    assert Settings.from_env({"BATCHSVC_STORAGE": "local"}) == Settings.from_env({})
    s3 = {"BATCHSVC_STORAGE": "local", "BATCHSVC_STORAGE_URL": "s3://b"}
    assert Settings.from_env(s3).storage_url == StorageURL(bucket="b")
    with pytest.raises(ConfigError, match="BATCHSVC_STORAGE_URL"):
        Settings.from_env({"BATCHSVC_STORAGE": "s3"})


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8765")
    monkeypatch.setenv("CONCURRENCY", "3")
    s = Settings.from_env()
    assert (s.port, s.worker_concurrency) == (8765, 3)


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]
    assert s.with_overrides(port=1).port == 1
    assert s.port == 8000


@pytest.mark.parametrize(
    ("concurrency", "processes", "cpus", "layout"),
    [
        (8, None, 2, [8]),  # the default: one process
        (16, None, 2, [16]),
        (64, None, 2, [16, 16, 16, 16]),  # every 16 threads get a process...
        (40, None, 4, [14, 13, 13]),
        (256, None, 2, [64, 64, 64, 64]),  # ...but no more than two per core
        (64, None, 1, [32, 32]),
        (64, 1, 8, [64]),  # WORKER_PROCESSES decides when set
        (10, 4, 1, [3, 3, 2, 2]),
        (2, 5, 8, [1, 1]),  # never a process without a thread
    ],
)
def test_worker_layout_splits_the_threads_across_processes(
    concurrency: int, processes: int | None, cpus: int, layout: list[int]
) -> None:
    settings = Settings(worker_concurrency=concurrency, worker_processes=processes)
    assert settings.worker_layout(cpus) == layout
    assert sum(layout) == concurrency


def test_worker_processes_auto_is_the_default() -> None:
    assert Settings.from_env({"WORKER_PROCESSES": "auto"}).worker_processes is None
    assert Settings.from_env({"WORKER_PROCESSES": " AUTO "}).worker_processes is None


# -- Redis behind Sentinel -----------------------------------------------------------------


def test_every_sentinel_variable_is_read() -> None:
    s = Settings.from_env(
        {
            "REDIS_SENTINELS": " 10.0.0.1:26379, sentinel-b ,[fd00::3]:26380,",
            "REDIS_MASTER_NAME": " batchsvc ",
            "REDIS_PASSWORD": " pw with spaces@/: ",
            "REDIS_SENTINEL_PASSWORD": "sentinel#pw",
            "REDIS_DB": "4",
        }
    )
    assert s.redis_url is None
    assert s.redis_sentinel == RedisSentinel(
        # a sentinel without a port is on Sentinel's own, 26379
        sentinels=(("10.0.0.1", 26379), ("sentinel-b", 26379), ("fd00::3", 26380)),
        master_name="batchsvc",
        # passwords are taken as they are: a space may be part of one
        password=" pw with spaces@/: ",
        sentinel_password="sentinel#pw",
        db=4,
    )


def test_sentinel_defaults() -> None:
    sentinel = Settings.from_env({"REDIS_SENTINELS": "s1"}).redis_sentinel
    assert sentinel == RedisSentinel(sentinels=(("s1", 26379),))
    assert (sentinel.master_name, sentinel.password, sentinel.sentinel_password, sentinel.db) == (
        "mymaster",
        None,
        None,
        0,
    )


def test_redis_url_and_sentinels_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="REDIS_URL and REDIS_SENTINELS"):
        Settings.from_env({"REDIS_URL": "redis://r:6379/0", "REDIS_SENTINELS": "s1:26379"})


@pytest.mark.parametrize("name", ["REDIS_MASTER_NAME", "REDIS_SENTINEL_PASSWORD"])
def test_a_sentinel_option_without_sentinels_is_refused(name: str) -> None:
    # a typo in REDIS_SENTINELS must not fall back to another Redis unnoticed
    with pytest.raises(ConfigError, match=f"{name} set without REDIS_SENTINELS"):
        Settings.from_env({name: "x"})


def test_the_password_and_db_variables_alone_leave_redis_url_in_charge() -> None:
    # The Kubernetes manifests set REDIS_PASSWORD for the Redis container and expand it into
    # REDIS_URL: with REDIS_URL the URL's own password and db apply
    env = {"REDIS_URL": "redis://:pw@r:6379/2", "REDIS_PASSWORD": "pw", "REDIS_DB": "7"}
    s = Settings.from_env(env)
    assert (s.redis_url, s.redis_sentinel) == ("redis://:pw@r:6379/2", None)


@pytest.mark.parametrize(
    ("name", "raw"),
    [("REDIS_DB", "-1"), ("REDIS_DB", "one"), ("REDIS_MASTER_NAME", "my master")],
)
def test_a_bad_sentinel_option_is_a_config_error(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_SENTINELS": "s1:26379", name: raw})
    assert name in info.value.message
    assert repr(raw) in info.value.message


def test_passwords_stay_out_of_the_settings_repr() -> None:
    s = Settings.from_env(
        {
            "REDIS_SENTINELS": "s1",
            "REDIS_PASSWORD": "primary-secret",
            "REDIS_SENTINEL_PASSWORD": "sentinel-secret",
        }
    )
    assert "secret" not in repr(s)


@pytest.mark.parametrize("raw", ["off", "OFF", "0", "none"])
def test_the_rate_limit_can_be_turned_off(raw: str) -> None:
    assert Settings.from_env({"BATCHSVC_RATE_LIMIT": raw}).rate_limit is None
