"""The Ray token stays out of logs and command lines: kept in a 0600 file, named (not shown)
in `up`'s banner unless on a terminal, found by `join` in --token-file or $HOMEFLEET_TOKEN,
printed by `homefleet token`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from orchestrator.cli import build_parser
from orchestrator.cluster_token import TokenError, head_token, read_token_file, worker_token, write_token_file
from orchestrator.commands import up
from orchestrator.config import HomefleetConfig

TOKEN = "0123456789abcdef" * 4


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0)  # the most permissive umask: the file must still be 0600
    yield
    os.umask(old)


def test_the_token_file_is_0600_whatever_the_umask_and_its_new_folder_0700(tmp_path, open_umask):
    path = tmp_path / "config" / "homefleet" / "ray_token"
    write_token_file(path, TOKEN)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    assert read_token_file(path) == TOKEN
    assert [p.name for p in path.parent.iterdir()] == ["ray_token"]  # no partial file left


def test_rewriting_the_token_file_keeps_it_0600(tmp_path, open_umask):
    path = tmp_path / "ray_token"
    path.write_text("old\n")
    path.chmod(0o644)
    write_token_file(path, TOKEN)
    assert mode(path) == 0o600 and read_token_file(path) == TOKEN


def test_up_makes_a_token_and_keeps_it_in_a_0600_file(tmp_path, open_umask):
    path = tmp_path / "ray_token"
    token, warning = head_token(path, {})
    assert len(token) == 64 and warning is None
    assert mode(path) == 0o600 and read_token_file(path) == token
    assert head_token(path, {}) == (token, None)  # the same token on the next start


@pytest.mark.parametrize("variable", ["HOMEFLEET_TOKEN", "RAY_AUTH_TOKEN"])
def test_up_keeps_a_token_from_the_environment_in_the_file(tmp_path, variable):
    path = tmp_path / "ray_token"
    assert head_token(path, {variable: TOKEN}) == (TOKEN, None)
    assert read_token_file(path) == TOKEN and mode(path) == 0o600


def test_up_refuses_a_token_in_the_environment_that_differs_from_the_file(tmp_path):
    path = tmp_path / "ray_token"
    write_token_file(path, TOKEN)
    with pytest.raises(TokenError, match=r"\$RAY_AUTH_TOKEN differs from the token in .*ray_token"):
        head_token(path, {"RAY_AUTH_TOKEN": "other"})


def test_up_warns_when_it_cannot_keep_the_token(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the token file's folder cannot be made (as with a read-only /etc)
    token, warning = head_token(blocker / "ray_token", {"RAY_AUTH_TOKEN": TOKEN})
    assert token == TOKEN and "could not keep the token" in warning and TOKEN not in warning
    with pytest.raises(TokenError, match="cannot keep a new token"):
        head_token(blocker / "ray_token", {})  # a new token nobody could read: no machine could join


def test_a_world_readable_token_file_is_warned_about(tmp_path):
    path = tmp_path / "ray_token"
    path.write_text(TOKEN)
    path.chmod(0o644)
    token, warning = worker_token(path, {})
    assert token == TOKEN and "chmod 600" in warning


@pytest.mark.parametrize("flag, environ, expected", [
    ("flag", {"HOMEFLEET_TOKEN": "from-env"}, "from-flag"),      # --token-file first
    (None, {"HOMEFLEET_TOKEN": "from-env", "RAY_AUTH_TOKEN": "ray"}, "from-env"),
    (None, {"RAY_AUTH_TOKEN": "ray"}, "ray"),
    (None, {}, "from-default"),                                  # this user's file (the head's own machine)
])
def test_join_finds_its_token_in_the_flag_then_the_environment_then_the_default_file(tmp_path, flag, environ,
                                                                                     expected):
    flag_file, default_file = tmp_path / "flag", tmp_path / "default"
    flag_file.write_text("from-flag\n")
    default_file.write_text("from-default\n")
    token, _ = worker_token(flag_file if flag else None, environ, default_file=default_file)
    assert token == expected


def test_join_without_any_token_says_where_to_get_one(tmp_path):
    with pytest.raises(TokenError, match="--token-file FILE.*homefleet token.*HOMEFLEET_TOKEN"):
        worker_token(None, {}, default_file=tmp_path / "none")
    with pytest.raises(TokenError, match="no token file at"):
        worker_token(tmp_path / "missing", {})


def test_join_takes_token_file_and_not_both_ways_at_once():
    parser = build_parser()
    args = parser.parse_args(["join", "h:6379", "--token-file", "/etc/homefleet/ray_token"])
    assert args.token_file == Path("/etc/homefleet/ray_token") and args.token is None
    with pytest.raises(SystemExit):
        parser.parse_args(["join", "h:6379", "--token-file", "f", "--token", "t"])


# ----------------------------------------------------------------------------- up's banner


def test_the_banner_names_the_token_file_and_never_the_token_when_not_on_a_terminal(capsys):
    text = up.banner(HomefleetConfig(), "192.168.1.10:6379", Path("/var/lib/homefleet/ray_token"))
    assert "homefleet join 192.168.1.10:6379 --token-file /var/lib/homefleet/ray_token --name NAME" in text
    assert "homefleet token" in text
    assert not up._on_terminal()  # pytest captures stdout: no terminal, so run() passes no token
    assert TOKEN not in text


def test_the_banner_shows_the_token_on_a_terminal():
    text = up.banner(HomefleetConfig(), "192.168.1.10:6379", Path("/t/ray_token"), token=TOKEN)
    assert TOKEN in text and "--token-file /t/ray_token" in text


def test_the_join_line_keeps_the_head_address_first():
    # tests/support.py and people's scripts read the address right after `homefleet join`.
    text = up.banner(HomefleetConfig(), "127.0.0.2:6379", Path("/t/ray_token"))
    line = next(line for line in text.splitlines() if "homefleet join " in line)
    assert line.split("homefleet join ", 1)[1].split()[0] == "127.0.0.2:6379"


# ----------------------------------------------------------------------------- homefleet token


def test_homefleet_token_prints_the_token_of_the_file(tmp_path, capsys):
    path = tmp_path / "ray_token"
    write_token_file(path, TOKEN)
    args = build_parser().parse_args(["token", "--token-file", str(path)])
    assert args.func(args) == 0
    assert capsys.readouterr().out == TOKEN + "\n"


def test_homefleet_token_without_a_file_says_so_and_exits_1(tmp_path, capsys):
    args = build_parser().parse_args(["token", "--token-file", str(tmp_path / "none")])
    assert args.func(args) == 1
    assert "no token file at" in capsys.readouterr().err
