"""The app's command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import DEFAULT_MODEL, parse_args, parse_credentials


def test_defaults(monkeypatch):
    monkeypatch.delenv("LENS_AUTH", raising=False)
    settings = parse_args([])
    assert settings.model == DEFAULT_MODEL == "microsoft/Lens-Turbo"
    assert (settings.memory_mode, settings.output_dir, settings.auth, settings.share) == (
        "auto",
        Path("outputs"),
        [],
        False,
    )


def test_all_options(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_AUTH", "carol:pw3")
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# users\nbob:pw2\n\n")
    settings = parse_args(
        [
            "--model",
            "tiny",
            "--memory-mode",
            "full",
            "--output-dir",
            str(tmp_path),
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--share",
            "--auth",
            "alice:pw:with:colons",
            "--auth-file",
            str(auth_file),
            "--queue-size",
            "4",
            "--rewriter-url",
            "http://localhost:8080/v1",
            "--rewriter-model",
            "llama",
            "--rewriter-key-env",
            "MY_KEY",
        ]
    )
    assert settings.auth == [("alice", "pw:with:colons"), ("bob", "pw2"), ("carol", "pw3")]
    assert (settings.model, settings.port, settings.queue_size, settings.share) == ("tiny", 8000, 4, True)
    assert (settings.rewriter.base_url, settings.rewriter.model, settings.rewriter.api_key_env) == (
        "http://localhost:8080/v1",
        "llama",
        "MY_KEY",
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--memory-mode", "huge"],
        ["--auth", "nopassword"],
        ["--queue-size", "0"],
        ["--port", "70000"],
        ["--auth-file", "/no/such/file"],
        ["--rewriter-url", "not a url"],
        ["--rewriter-key-env", "BAD NAME"],
    ],
)
def test_bad_options_exit_with_a_message(argv, capsys, monkeypatch):
    monkeypatch.delenv("LENS_AUTH", raising=False)
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_credentials_errors_never_echo_the_password():
    with pytest.raises(ValueError) as caught:
        parse_credentials("alice:ok, secretword", "--auth")
    assert "secretword" not in str(caught.value) and "entry 2" in str(caught.value)
