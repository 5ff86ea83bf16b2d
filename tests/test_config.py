"""Settings: the example file loads, the environment wins, and every bad key is named at once."""

from __future__ import annotations

import grp
from pathlib import Path

import pytest

from mailgate.config import (
    Listen,
    OutputHost,
    Relay,
    default_helo_name,
    load_operator_settings,
    load_settings,
)
from mailgate.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {
    "MAILGATE_DOMAIN": "agents.example.com",
    "MAILGATE_WORKERS": "research=wrk_1",
    "MAILGATE_ALLOWED_SENDERS": "*",
    "MAILGATE_AUTH": "none",
    "HANDINGER_BASE_URL": "http://127.0.0.1:8787",
}


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    return info.value.problems


def test_the_example_file_loads() -> None:
    """config.example.env is a valid configuration as shipped."""
    settings = load_settings(ROOT / "config.example.env")
    assert settings.domain == "agents.example.com"
    assert settings.workers["research"].worker_id == "wrk_research"
    assert settings.auth == "dmarc"
    assert settings.authserv_id == "mx.example.com"


def test_the_environment_wins_over_the_file(tmp_path: Path) -> None:
    """A value in the process environment overrides the same key in the env file."""
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in MINIMAL.items()) + "MAILGATE_CONCURRENCY=5\n")
    assert load_settings(env_file, {"MAILGATE_CONCURRENCY": "7"}).concurrency == 7
    assert load_settings(env_file, {}).concurrency == 5


def test_every_bad_key_is_named_at_once() -> None:
    """One ConfigError lists each bad key with its reason."""
    found = problems(
        {
            "MAILGATE_WORKERS": "research",
            "MAILGATE_ALLOWED_SENDERS": "not-an-address",
            "MAILGATE_LISTEN": "localhost:http",
            "MAILGATE_CONCURRENCY": "-1",
            "MAILGATE_SMTP_RELAY": "http://relay.example",
            "HANDINGER_BASE_URL": "https://api.example.com",
        }
    )
    named = {p.split(":")[0] for p in found}
    assert named >= {
        "MAILGATE_DOMAIN", "MAILGATE_WORKERS", "MAILGATE_ALLOWED_SENDERS", "MAILGATE_LISTEN",
        "MAILGATE_CONCURRENCY", "MAILGATE_SMTP_RELAY", "HANDINGER_API_KEY", "MAILGATE_AUTHSERV_ID",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("MAILGATE_WORKERS", "a-very-long-alias-name-over-24=wrk_1"),
        ("MAILGATE_WORKERS", "research=wrk_1:enormous"),
        ("MAILGATE_WORKERS", "research=wrk_1:unlimited"),  # above the default MAILGATE_MAX_BUDGET
        ("MAILGATE_AUTH", "spf"),
        ("MAILGATE_SECRET", "short"),
        ("MAILGATE_FILES_FIELD", "attachments"),
        ("MAILGATE_REQUIRE_STARTTLS", "true"),
        ("MAILGATE_TLS_CERT", "/nonexistent/cert.pem"),
        ("MAILGATE_OUTPUT_HOSTS", "https://files.example.com/"),
        ("MAILGATE_OUTPUT_HOSTS", "files.example.com:0"),
        ("MAILGATE_OUTPUT_HOSTS", "*.10.0.0.1"),
        ("MAILGATE_OUTPUT_HOSTS", "files example.com"),
        ("MAILGATE_MAX_ANSWER_INLINE", "0"),
        ("MAILGATE_MAX_REPLY_SIZE", "ten"),
        ("MAILGATE_UNKNOWN_SENDERS", "bounce"),
        ("MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR", "0"),
        ("MAILGATE_MAX_REPLIES_PER_MINUTE", "many"),
        ("MAILGATE_MIN_FREE_SPACE", "-1"),
        ("MAILGATE_MIN_FREE_SPACE", "60M"),
        ("MAILGATE_MAX_CONNECTIONS_PER_CLIENT", "0"),
        ("MAILGATE_SMTP_SESSION_TIMEOUT", "forever"),
    ],
)
def test_bad_values_are_refused(key: str, value: str) -> None:
    """Each malformed value is reported under its own name."""
    assert any(p.startswith(key) for p in problems({**MINIMAL, key: value}))


def test_the_loop_breakers_and_unknown_senders() -> None:
    """Defaults 30 / 120 / refuse (as before); each can be set, `hold` in any case."""
    default = load_settings(environ=MINIMAL)
    assert (
        default.max_replies_per_address_per_hour,
        default.max_replies_per_minute,
        default.unknown_senders,
    ) == (30, 120, "refuse")
    custom = load_settings(
        environ={
            **MINIMAL,
            "MAILGATE_MAX_REPLIES_PER_ADDRESS_PER_HOUR": "5",
            "MAILGATE_MAX_REPLIES_PER_MINUTE": "60",
            "MAILGATE_UNKNOWN_SENDERS": "HOLD",
        }
    )
    assert (custom.max_replies_per_address_per_hour, custom.max_replies_per_minute) == (5, 60)
    assert custom.unknown_senders == "hold"


def test_the_free_space_floor_follows_the_message_size_limit() -> None:
    """MAILGATE_MIN_FREE_SPACE defaults to 1.5 x MAILGATE_MAX_MESSAGE_SIZE (as Postfix's queue_minfree
    advice); an explicit value wins, 0 turns it off; the SMTP session limits have Postfix-like defaults."""
    settings = load_settings(environ=MINIMAL)
    assert settings.min_free_space == 60 * 1024 * 1024
    assert (settings.max_connections_per_client, settings.smtp_session_timeout) == (20, 3600.0)
    assert load_settings(environ={**MINIMAL, "MAILGATE_MAX_MESSAGE_SIZE": "1000"}).min_free_space == 1500
    assert load_settings(environ={**MINIMAL, "MAILGATE_MIN_FREE_SPACE": "0"}).min_free_space == 0


def test_the_api_key_is_optional_only_on_loopback() -> None:
    """A sandbox on 127.0.0.1 needs no key; any other API does."""
    assert load_settings(environ=MINIMAL).api_key is None
    assert problems({**MINIMAL, "HANDINGER_BASE_URL": "https://handinger.com"}) == [
        "HANDINGER_API_KEY: required (only a sandbox on a loopback address runs without one)"
    ]


def test_secrets_stay_out_of_repr() -> None:
    """The API key, the token secret and the relay password never appear in a repr."""
    settings = load_settings(
        environ={
            **MINIMAL,
            "HANDINGER_API_KEY": "sk-live-123",
            "MAILGATE_SECRET": "s3cr3t-s3cr3t-s3cr3t",
            "MAILGATE_SMTP_RELAY": "smtp+starttls://user:pa%40ss@relay.example:2587",
        }
    )
    text = repr(settings)
    assert "sk-live-123" not in text and "s3cr3t" not in text and "pa@ss" not in text
    assert settings.smtp_relay == Relay("smtp+starttls", "relay.example", 2587, "user", "pa@ss")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2525", Listen("127.0.0.1", 2525)),
        ("[::1]:25", Listen("::1", 25)),
        (":2600", Listen("127.0.0.1", 2600)),
    ],
)
def test_listen_addresses(value: str, expected: Listen) -> None:
    """host:port, bracketed IPv6 and a bare port all parse."""
    assert load_settings(environ={**MINIMAL, "MAILGATE_LISTEN": value}).listen == expected


def test_lmtp_on_a_unix_socket() -> None:
    """MAILGATE_LMTP_LISTEN takes unix:/path."""
    settings = load_settings(environ={**MINIMAL, "MAILGATE_LMTP_LISTEN": "unix:/run/mailgate/lmtp.sock"})
    assert settings.lmtp_listen == Listen(unix_path="/run/mailgate/lmtp.sock")


def test_a_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    """--env-file pointing nowhere is reported, not ignored."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.env")


@pytest.mark.parametrize(
    ("value", "mode"), [("0660", 0o660), ("0o640", 0o640), ("600", 0o600), ("0777", 0o777)]
)
def test_lmtp_socket_mode_is_octal(value: str, mode: int) -> None:
    """MAILGATE_LMTP_SOCKET_MODE reads as octal, with or without 0 / 0o; the default is 0660."""
    assert load_settings(environ={**MINIMAL, "MAILGATE_LMTP_SOCKET_MODE": value}).lmtp_socket_mode == mode
    assert load_settings(environ=MINIMAL).lmtp_socket_mode == 0o660


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("0990", "expected an octal mode such as 0660, got '0990'"),
        ("rw-rw----", "expected an octal mode such as 0660, got 'rw-rw----'"),
        ("0", "expected a mode between 0001 and 0777, got '0'"),
        ("01660", "expected a mode between 0001 and 0777, got '01660'"),
    ],
)
def test_bad_lmtp_socket_modes_are_named(value: str, says: str) -> None:
    """A mode that is not octal, or outside 0001..0777 (no setuid/sticky bits), is refused by name."""
    assert problems({**MINIMAL, "MAILGATE_LMTP_SOCKET_MODE": value}) == [f"MAILGATE_LMTP_SOCKET_MODE: {says}"]


def test_lmtp_socket_group_by_name_or_number() -> None:
    """MAILGATE_LMTP_SOCKET_GROUP takes a group name or gid, resolved to the gid at load; unset: None
    (the socket keeps the process's group)."""
    root = grp.getgrgid(0).gr_name
    assert load_settings(environ={**MINIMAL, "MAILGATE_LMTP_SOCKET_GROUP": root}).lmtp_socket_group == 0
    assert load_settings(environ={**MINIMAL, "MAILGATE_LMTP_SOCKET_GROUP": "0"}).lmtp_socket_group == 0
    assert load_settings(environ=MINIMAL).lmtp_socket_group is None


@pytest.mark.parametrize("value", ["no-such-group-mailgate", "4294967000"])
def test_an_unknown_lmtp_socket_group_is_named(value: str) -> None:
    """A group that does not exist is a bad key at load time, not a failed chown at start."""
    assert problems({**MINIMAL, "MAILGATE_LMTP_SOCKET_GROUP": value}) == [
        f"MAILGATE_LMTP_SOCKET_GROUP: no such group: {value!r}"
    ]


@pytest.mark.parametrize("value", ["mx.example.com", "MX.Example.COM.", "[192.0.2.1]", "[IPv6:2001:db8::1]"])
def test_helo_name_takes_a_host_name_or_an_address_literal(value: str) -> None:
    """MAILGATE_HELO_NAME: a host name (lowercased, no trailing dot) or an RFC 5321 address literal."""
    expected = value if value.startswith("[") else "mx.example.com"
    assert load_settings(environ={**MINIMAL, "MAILGATE_HELO_NAME": value}).helo_name == expected


@pytest.mark.parametrize("value", ["not a name", "mx_1.example.com", "[999.0.0.1]", "[mx.example.com]"])
def test_bad_helo_names_are_named(value: str) -> None:
    """Anything else is refused under MAILGATE_HELO_NAME."""
    assert [p.split(":")[0] for p in problems({**MINIMAL, "MAILGATE_HELO_NAME": value})] == [
        "MAILGATE_HELO_NAME"
    ]


@pytest.mark.parametrize(
    ("fqdn", "expected"),
    [
        ("mx1.example.net", "mx1.example.net"),
        ("MX1.Example.NET.", "mx1.example.net"),
        ("localhost", "agents.example.com"),
        ("localhost.localdomain", "agents.example.com"),
        ("vm.localdomain", "agents.example.com"),
        ("vm", "agents.example.com"),
    ],
)
def test_the_default_helo_name_is_never_localhost(fqdn: str, expected: str) -> None:
    """The machine's FQDN, unless it knows itself only as localhost or by a bare name: then the domain."""
    assert default_helo_name("agents.example.com", fqdn) == expected


def test_the_default_helo_name_of_this_machine() -> None:
    """Unset, the EHLO name is this machine's FQDN or the domain: a dotted name, never localhost."""
    name = load_settings(environ=MINIMAL).helo_name
    assert name == default_helo_name("agents.example.com")
    assert name is not None and "." in name and not name.startswith("localhost")


def test_log_format_and_metrics_listen() -> None:
    """MAILGATE_LOG_FORMAT is logfmt (default) or json; MAILGATE_METRICS_LISTEN is off unless set."""
    settings = load_settings(environ=MINIMAL)
    assert (settings.log_format, settings.metrics_listen) == ("logfmt", None)
    settings = load_settings(
        environ=MINIMAL | {"MAILGATE_LOG_FORMAT": "JSON", "MAILGATE_METRICS_LISTEN": ":9125"}
    )
    assert (settings.log_format, settings.metrics_listen) == ("json", Listen("127.0.0.1", 9125))
    bad = problems(MINIMAL | {"MAILGATE_LOG_FORMAT": "xml", "MAILGATE_METRICS_LISTEN": "9125"})
    assert [p.split(":")[0] for p in bad] == ["MAILGATE_LOG_FORMAT", "MAILGATE_METRICS_LISTEN"]


def test_operator_settings_read_dot_env_in_the_working_directory(tmp_path: Path) -> None:
    """Without an env file the operator verbs read ./.env; the environment wins; gateway keys are not
    asked for; every bad key they read is named; the API key is needed only to call the API."""
    (tmp_path / ".env").write_text("MAILGATE_DATABASE=/srv/mg.db\nMAILGATE_LOG_FORMAT=json\n")
    settings = load_operator_settings(environ={"MAILGATE_LOG_FORMAT": "logfmt"}, cwd=tmp_path)
    assert (settings.database, settings.log_format, settings.log_level) == (
        Path("/srv/mg.db"),
        "logfmt",
        "WARNING",
    )
    assert settings.api_problem() is not None and "HANDINGER_API_KEY" in str(settings.api_problem())
    assert load_operator_settings(environ={}, cwd=tmp_path / "nowhere").database == Path("var/mailgate.db")
    local = load_operator_settings(environ={"HANDINGER_BASE_URL": "http://127.0.0.1:8787"}, cwd=tmp_path)
    assert local.api_problem() is None
    with pytest.raises(ConfigError) as info:
        load_operator_settings(
            environ={"HANDINGER_BASE_URL": "ftp://x", "MAILGATE_LOG_LEVEL": "LOUD"}, cwd=tmp_path
        )
    assert [p.split(":")[0] for p in info.value.problems] == ["HANDINGER_BASE_URL", "MAILGATE_LOG_LEVEL"]


def test_output_hosts_parse_and_match() -> None:
    """MAILGATE_OUTPUT_HOSTS: names as written (IDNA, lower case), default ports unless given, `*.` for
    names under a domain; a host is the URL's host, so a name never matches its address."""
    settings = load_settings(
        environ={
            **MINIMAL,
            "MAILGATE_OUTPUT_HOSTS": "Files.Example.com, *.cdn.example.net:8443, [::1]:9, bücher.example",
        }
    )
    files, cdn, v6, idn = settings.output_hosts
    assert (files, cdn, v6) == (
        OutputHost("files.example.com"),
        OutputHost("cdn.example.net", 8443, True),
        OutputHost("::1", 9),
    )
    assert idn == OutputHost("xn--bcher-kva.example")
    assert files.matches("https", "files.example.com", 443) and files.matches("http", "files.example.com", 80)
    assert not files.matches("https", "files.example.com", 8443)
    assert not files.matches("https", "evil.files.example.com", 443)
    assert cdn.matches("https", "a.b.cdn.example.net", 8443) and not cdn.matches(
        "https", "cdn.example.net", 8443
    )
    assert not cdn.matches("https", "a.cdn.example.net", 443)
    assert v6.matches("http", "::1", 9) and not v6.matches("http", "localhost", 9)
    assert str(cdn) == "*.cdn.example.net:8443" and str(v6) == "[::1]:9"
    assert load_settings(environ=MINIMAL).output_hosts == ()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mailgate:s3cret@db.example.com:5432/mailgate?sslmode=verify-full",
        "postgres://mailgate@db.example.com/mailgate",
        "postgresql:///mailgate?host=/run/postgresql",
    ],
)
def test_a_postgresql_url_selects_postgresql_and_hides_its_password(url: str) -> None:
    """MAILGATE_DATABASE as a libpq URL selects PostgreSQL; the password never shows in repr or labels."""
    pytest.importorskip("psycopg")
    settings = load_settings(environ={**MINIMAL, "MAILGATE_DATABASE": url})
    assert settings.database_url == url
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.store_label
    assert settings.store_label.startswith(url.split(":", 1)[0])
    assert settings.lease_seconds == 60.0


def test_a_path_keeps_sqlite() -> None:
    """Anything that is not a postgresql:// or postgres:// URL is an SQLite path, as before."""
    settings = load_settings(environ={**MINIMAL, "MAILGATE_DATABASE": "/var/lib/mailgate/postgres.db"})
    assert (settings.database_url, settings.database) == (None, Path("/var/lib/mailgate/postgres.db"))
    assert settings.store_label == "/var/lib/mailgate/postgres.db"


def test_a_bad_postgresql_url_and_lease_are_named() -> None:
    """A URL libpq refuses and a lease under a second are both named, in one go."""
    pytest.importorskip("psycopg")
    found = problems(
        {**MINIMAL, "MAILGATE_DATABASE": "postgresql://h/db?nosuchoption=1", "MAILGATE_LEASE_SECONDS": "0.5"}
    )
    assert [p.split(":", 1)[0] for p in found] == ["MAILGATE_DATABASE", "MAILGATE_LEASE_SECONDS"]
    assert "nosuchoption" in found[0]


def test_retention_and_the_header_limit_default_as_postfix_would() -> None:
    """MAILGATE_RETENTION_DAYS is 30 days unless set (0 keeps raw bytes, for serve and the operator verbs
    alike); MAILGATE_MAX_HEADER_SIZE is Postfix's header_size_limit, 102400."""
    settings = load_settings(environ=MINIMAL)
    assert (settings.retention_days, settings.max_header_size) == (30.0, 102400)
    assert load_settings(environ=MINIMAL | {"MAILGATE_RETENTION_DAYS": "0"}).retention_days == 0
    assert load_operator_settings(environ={"MAILGATE_RETENTION_DAYS": "7.5"}).retention_days == 7.5
    assert problems(MINIMAL | {"MAILGATE_RETENTION_DAYS": "-1"}) == [
        "MAILGATE_RETENTION_DAYS: must be 0 (keep forever) or a positive number of days, got -1"
    ]


def test_an_allowed_sender_may_name_an_internationalised_domain() -> None:
    """`@mächine.example` is kept in its IDNA form, as sender domains are compared."""
    settings = load_settings(
        environ=MINIMAL | {"MAILGATE_ALLOWED_SENDERS": "@Mächine.example,jdöe@b.example"}
    )
    assert settings.allowed_senders == ("@xn--mchine-bua.example", "jdöe@b.example")
