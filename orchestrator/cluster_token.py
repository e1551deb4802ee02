"""The cluster's Ray token: where it is kept, how each command finds it.

Anyone who holds the token can run code on every node, so it is never printed to a log nor
put on a command line (where `ps` shows it to every user): `homefleet up` keeps it in a file
only its user can read (0600) and prints the join command with `--token-file`; `homefleet
join` reads that file or $HOMEFLEET_TOKEN; `homefleet token` prints it, on request.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TOKEN_FILE = Path("~/.config/homefleet/ray_token")
# Where a token may come from in the environment, first wins: ours, then Ray's own name.
TOKEN_ENV_VARS = ("HOMEFLEET_TOKEN", "RAY_AUTH_TOKEN")


class TokenError(ValueError):
    """No usable token; the message says where it was looked for and what to do."""


def token_from_environment(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, token) of the first token variable set, or None."""
    for name in TOKEN_ENV_VARS:
        value = (environ.get(name) or "").strip()
        if value:
            return name, value
    return None


def read_token_file(path: Path) -> str:
    path = path.expanduser()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise TokenError(f"no token file at {path}") from None
    except OSError as exc:
        raise TokenError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise TokenError(f"the token file {path} is empty")
    return token


def write_token_file(path: Path, token: str) -> None:
    """Write the token so that only this user can read it (0600, whatever the umask), in one
    step: a reader never sees half a token. A folder it makes is 0700."""
    path = path.expanduser()
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def loose_permissions_warning(path: Path) -> str | None:
    """A warning when every user of this machine may read the token file."""
    path = path.expanduser()
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return f"the token file {path} is readable by every user of this machine: chmod 600 {path}"
    return None


def head_token(token_file: Path, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The token `homefleet up` uses, and a warning (or None).

    $HOMEFLEET_TOKEN or $RAY_AUTH_TOKEN, else the token file, else a new random token; the
    token in use is kept in the file (0600) for `--token-file` and `homefleet token`. A token
    in the environment that differs from the file's is an error: one of them is stale.
    A file that cannot be written (a read-only /etc under systemd) is a warning for a token
    from the environment, an error for a new one."""
    path = token_file.expanduser()
    from_env = token_from_environment(environ)
    kept = read_token_file(path) if path.is_file() else None
    if from_env and kept and from_env[1] != kept:
        raise TokenError(f"${from_env[0]} differs from the token in {path}: remove the stale one "
                         f"(every node must use the same token)")
    token = from_env[1] if from_env else kept or secrets.token_hex(32)
    if kept == token:
        return token, loose_permissions_warning(path)
    try:
        write_token_file(path, token)
    except OSError as exc:
        if not from_env:  # a new token no one could ever read: no machine could join
            raise TokenError(f"cannot keep a new token in {path} ({exc.strerror}): write one there yourself "
                             "(deploy/README.md) or set $HOMEFLEET_TOKEN") from None
        return token, f"could not keep the token in {path} ({exc.strerror}); `homefleet join` needs it there"
    return token, None


def worker_token(token_file: Path | None, environ: Mapping[str, str],
                 default_file: Path = DEFAULT_TOKEN_FILE) -> tuple[str, str | None]:
    """The token `homefleet join` uses, and a warning (or None): `--token-file`, else
    $HOMEFLEET_TOKEN or $RAY_AUTH_TOKEN, else this user's token file (where `homefleet up`
    keeps it, so that joining the head's own machine needs no flag)."""
    if token_file is not None:
        return read_token_file(token_file), loose_permissions_warning(token_file)
    from_env = token_from_environment(environ)
    if from_env:
        return from_env[1], None
    if default_file.expanduser().is_file():
        return read_token_file(default_file), loose_permissions_warning(default_file)
    raise TokenError(f"needs the cluster's token: --token-file FILE (a copy of the head's {DEFAULT_TOKEN_FILE}, "
                     f"which `homefleet token` prints there) or $HOMEFLEET_TOKEN")
