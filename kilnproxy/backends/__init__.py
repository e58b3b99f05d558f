"""Backends (SPEC 5): where a route's repository command actually runs."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from kilnproxy.backends.agent import AgentBackend, agent_pool, client_context
from kilnproxy.backends.base import Backend, BackendRequest, BackendSink, BackendStream
from kilnproxy.backends.local import LocalBackend
from kilnproxy.backends.ssh import SshBackend, Target, ssh_pool
from kilnproxy.config import BackendAgentSettings, BackendSshSettings
from kilnproxy.directory.model import Route, parse_backend_url


class Backends:
    """One Backend object per (name, URL), made on first use and kept for the worker's life.

    A backend whose URL changes in the directory gets a new object (and pool) on next use.
    """

    def __init__(
        self,
        state_dir: Path,
        ssh: BackendSshSettings,
        agent: BackendAgentSettings,
        dial_timeout: float,
        on_dial: Callable[[float], None] | None = None,
    ) -> None:
        self._state_dir = state_dir
        self._on_dial = on_dial
        self._ssh = ssh
        self._agent = agent
        self._tls: ssl.SSLContext | None = None  # made at the first agent dial, then kept
        self._dial_timeout = dial_timeout
        self._by_key: dict[tuple[str, str], Backend] = {}

    def for_route(self, route: Route) -> Backend:
        key = (route.backend, route.backend_url)
        backend = self._by_key.get(key)
        if backend is None:
            backend = self._make(route.backend, route.backend_url)
            self._by_key[key] = backend
        return backend

    def _make(self, name: str, url_text: str) -> Backend:
        url = parse_backend_url(url_text)
        if url.scheme == "local":
            return LocalBackend(name, self._state_dir)  # a route's path has the base in it
        if url.scheme == "agent":
            agent = self._agent
            settings = (agent.max_sessions_per_connection, agent.pool_idle, agent.keepalive)
            address = (url.host, url.port)
            pool = agent_pool(
                name, address, self._tls_context, settings, self._dial_timeout, self._on_dial
            )
            return AgentBackend(name, pool, agent.window)
        ssh = self._ssh
        target = Target(name, url.host, url.port, url.user, ssh.key, ssh.known_hosts, ssh.keepalive)
        limits = (ssh.max_sessions_per_connection, ssh.pool_idle, self._dial_timeout)
        return SshBackend(name, ssh_pool(target, *limits, self._on_dial), ssh.window)

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            agent = self._agent
            self._tls = client_context(agent.ca, agent.cert, agent.key)
        return self._tls

    def statistics(self) -> dict[str, dict[str, int]]:
        return {
            name: backend.pool.statistics()
            for (name, _), backend in self._by_key.items()
            if isinstance(backend, SshBackend | AgentBackend)
        }

    async def close(self) -> None:
        for backend in self._by_key.values():
            await backend.close()
        self._by_key.clear()


__all__ = ["Backend", "BackendRequest", "BackendSink", "BackendStream", "Backends"]
