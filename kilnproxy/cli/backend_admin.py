"""`kilnproxy backends key` and `kilnproxy backends trust NAME` (SPEC 5, issue: SSH backends).

The proxy's own key is generated once and its public half is what the storage servers'
authorized_keys list. `trust` fetches a backend's host key, shows its fingerprint, and records it
in the known_hosts file that every dial is verified against.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncssh

from kilnproxy.cli.admin import replace_file
from kilnproxy.config import Config
from kilnproxy.directory import DirectoryStore
from kilnproxy.directory.model import parse_backend_url
from kilnproxy.errors import OperatorError, os_reason
from kilnproxy.ssh.keys import write_new_key


def ensure_backend_key(path: Path) -> tuple[asyncssh.SSHKey, bool]:
    """The proxy's backend key, generated on first use; True if it was just made."""
    if path.exists():
        try:
            return asyncssh.read_private_key(path), False
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise OperatorError(f"cannot read backend key {path}: {exc}") from None
    return write_new_key(path, "kilnproxy backend key"), True


def show_key(config: Config) -> list[str]:
    key, made = ensure_backend_key(config.backend_ssh.key)
    public = key.export_public_key().decode().strip()
    lines = [f"generated {config.backend_ssh.key}"] if made else []
    return [*lines, public]


def trust(directory: DirectoryStore, config: Config, name: str, timeout: float) -> list[str]:
    url = parse_backend_url(directory.backend_url(name))
    if url.scheme != "ssh":
        raise OperatorError(f"backend {name!r} is not an ssh:// backend")
    try:
        key = asyncio.run(asyncio.wait_for(_host_key(url.host, url.port), timeout))
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        reason = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)
        raise OperatorError(f"cannot reach {url.host}:{url.port}: {reason}") from None
    if key is None:
        raise OperatorError(f"{url.host}:{url.port} sent no host key")
    host = url.host if url.port == 22 else f"[{url.host}]:{url.port}"
    entry = f"{host} {key.export_public_key().decode().strip()}\n"
    known = config.backend_ssh.known_hosts
    try:
        existing = known.read_text().splitlines(keepends=True) if known.exists() else []
        kept = [line for line in existing if line.split(" ", 1)[0] != host]
        replace_file(known, "".join([*kept, entry]))
    except (OSError, UnicodeDecodeError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise OperatorError(f"cannot update [backend_ssh] known_hosts {known}: {reason}") from None
    fingerprint = key.get_fingerprint("sha256")
    replaced = " (replacing the previous key)" if len(kept) != len(existing) else ""
    return [f"{name}: {host} host key {fingerprint}", f"recorded in {known}{replaced}"]


async def _host_key(host: str, port: int) -> asyncssh.SSHKey | None:
    return await asyncssh.get_server_host_key(host, port, config=None)
