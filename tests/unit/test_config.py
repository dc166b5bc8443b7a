"""Configuration: bad settings fail at start-up with ConfigError naming the
variable, instead of misbehaving later."""

import pytest

from conftest import PROXY_DIR
from unit_helpers import ALICE_KEY, bearer


def config_error():
    from dce_proxy.config import ConfigError
    return ConfigError


def test_config_error_is_a_value_error():
    assert issubclass(config_error(), ValueError)


def test_no_keys_and_no_open_mode_is_refused(make_app):
    with pytest.raises(config_error()) as exc:
        make_app(DCE_API_KEYS=None)
    assert "DCE_API_KEYS" in str(exc.value) or "DCE_OPEN_MODE" in str(exc.value)


@pytest.mark.parametrize("name, value", [
    ("DCE_API_KEYS", "alice:short"),            # key under 16 characters
    ("DCE_API_KEYS", "tooshortkey"),
    ("DCE_MAX_CONCURRENT", "many"),
    ("DCE_MAX_CONCURRENT", "0"),
    ("DCE_MAX_CONCURRENT", "-3"),
    ("DCE_MAX_N", "sixteen"),
    ("DCE_MAX_N", "0"),
    ("DCE_DEFAULT_N", "1.5"),
    ("DCE_DEFAULT_N", "0"),
    ("DCE_DEFAULT_N", "17"),                    # above DCE_MAX_N (16): out of range
    ("DCE_DEFAULT_MAX_TOKENS", "lots"),
    ("DCE_DEFAULT_MAX_TOKENS", "0"),
    ("DCE_MAX_BODY_MB", "big"),
    ("DCE_MAX_BODY_MB", "-1"),
    ("DCE_FIRST_BYTE_TIMEOUT", "soon"),
    ("DCE_FIRST_BYTE_TIMEOUT", "-5"),
    ("DCE_HEARTBEAT_SECONDS", "often"),
    ("DCE_HEARTBEAT_SECONDS", "0"),
    ("DCE_HEARTBEAT_SECONDS", "60"),            # the extension gives up after 60 s of silence
    ("DCE_CORS_ORIGINS", "*"),                  # name the pages trusted with a key
    ("DCE_CORS_ORIGINS", "chat.example.com"),   # an origin has its scheme
    ("DCE_CORS_ORIGINS", "https://chat.example.com/app"),  # and no path
    ("DCE_QUEUE_TIMEOUT", "forever"),
    ("DCE_QUEUE_TIMEOUT", "-1"),
    ("DCE_RATE_LIMIT", "often"),
    ("DCE_API_KEYS_FILE", "/nonexistent/dce-keys.txt"),
    ("VLLM_API_KEY_FILE", "/nonexistent/vllm-key.txt"),
    ("DCE_AUTH_FAILURE_LIMIT", "many"),
    ("DCE_ANSWER_TIMEOUT", "-1"),
])
def test_bad_value_raises_config_error_naming_the_variable(make_app, name, value):
    with pytest.raises(config_error()) as exc:
        make_app(**{name: value})
    assert name in str(exc.value)


def test_open_mode_runs_without_keys(make_app):
    c = make_app(DCE_API_KEYS=None, DCE_OPEN_MODE="true").test_client()
    r = c.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200, r.data


def test_keys_file_with_comments_and_blank_lines(make_app, tmp_path):
    carol = "carol-key-cccccccccccc"
    plain = "plain-key-pppppppppppp"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# team keys\n\ncarol:{carol}\n   \n{plain}\n")
    c = make_app(DCE_API_KEYS=None, DCE_API_KEYS_FILE=str(keys)).test_client()
    assert c.get("/v1/models", headers=bearer(carol)).status_code == 200
    assert c.get("/v1/models", headers=bearer(plain)).status_code == 200
    assert c.get("/v1/models", headers=bearer("# team keys")).status_code == 401
    assert c.get("/v1/models", headers=bearer(ALICE_KEY)).status_code == 401


def test_create_app_reads_os_environ_when_env_is_none(fake_vllm, monkeypatch):
    from dce_proxy import create_app
    monkeypatch.setenv("VLLM_URL", fake_vllm.url)
    monkeypatch.setenv("DCE_API_KEYS", f"env:{ALICE_KEY}")
    monkeypatch.delenv("DCE_OPEN_MODE", raising=False)
    c = create_app().test_client()
    assert c.get("/v1/models", headers=bearer(ALICE_KEY)).status_code == 200


@pytest.mark.parametrize("storage", ["memory://", "memcached://cache:11211"])
def test_several_workers_need_limits_shared_in_redis(make_app, storage):
    with pytest.raises(config_error()) as exc:
        make_app(DCE_PROXY_WORKERS="2", DCE_RATELIMIT_STORAGE_URI=storage)
    assert "DCE_PROXY_WORKERS" in str(exc.value) and "redis://" in str(exc.value)


def test_several_workers_with_redis_start_without_reaching_it(make_app):
    # Redis is reached on the first limited request, not at start (compose orders the start-up).
    app = make_app(DCE_PROXY_WORKERS="2", DCE_RATELIMIT_STORAGE_URI="redis://127.0.0.1:9/0")
    assert type(app.extensions["dce_slots"]).__name__ == "LeasedSlots"


@pytest.mark.parametrize("content", ["", "short", "two words-0123456789abcdef"])
def test_a_vllm_key_file_without_one_good_key_stops_the_proxy(make_app, tmp_path, content):
    key_file = tmp_path / "vllm_api_key"
    key_file.write_text(content)
    with pytest.raises(config_error()) as exc:
        make_app(VLLM_API_KEY_FILE=str(key_file))
    assert "VLLM_API_KEY_FILE" in str(exc.value)
    assert not content or content not in str(exc.value)  # a secret is never echoed


def test_settings_come_from_the_environment_alone(monkeypatch):
    # The proxy used to load any .env up the tree from its code: run from a checkout after
    # `make up`, it took the compose file's .env for its own (issue 12).
    from dce_proxy.config import load_settings
    dotenv = PROXY_DIR / ".env"
    assert not dotenv.exists()
    monkeypatch.delenv("DCE_MAX_N", raising=False)
    monkeypatch.setenv("DCE_API_KEYS", f"alice:{ALICE_KEY}")
    dotenv.write_text("DCE_MAX_N=3\n")
    try:
        assert load_settings().max_n == 16
    finally:
        dotenv.unlink()


def test_the_limits_password_comes_from_its_secret_file_and_never_shows(tmp_path):
    from dce_proxy.config import load_settings
    password = tmp_path / "limits_password"
    password.write_text("pass_word-0123456789\n")
    settings = load_settings({"DCE_API_KEYS": f"alice:{ALICE_KEY}", "DCE_RATELIMIT_STORAGE_URI": "redis://limits:6379/0",
                              "DCE_RATELIMIT_PASSWORD_FILE": str(password), "VLLM_API_KEY_FILE": str(password)})
    assert settings.ratelimit_storage_uri == "redis://:pass_word-0123456789@limits:6379/0"
    assert "0123456789" not in repr(settings) and ALICE_KEY not in repr(settings)


@pytest.mark.parametrize("uri, secret", [("memory://", "0123456789abcdef0123"),
                                         ("redis://:other@limits:6379/0", "0123456789abcdef0123"),
                                         # Redis parses it from its config file: no quotes, no escapes.
                                         ("redis://limits:6379/0", "0123456789abcdef0123\"quote")])
def test_a_limits_password_needs_a_redis_uri_without_one_and_plain_characters(tmp_path, uri, secret):
    from dce_proxy.config import load_settings
    password = tmp_path / "limits_password"
    password.write_text(secret + "\n")
    with pytest.raises(config_error()) as exc:
        load_settings({"DCE_API_KEYS": f"alice:{ALICE_KEY}", "DCE_RATELIMIT_STORAGE_URI": uri,
                       "DCE_RATELIMIT_PASSWORD_FILE": str(password)})
    assert "DCE_RATELIMIT_" in str(exc.value) and "0123456789abcdef" not in str(exc.value)
