"""Backends (SPEC 5): where a route's repository command actually runs."""

from __future__ import annotations

from pathlib import Path

from kilnproxy.backends.base import Backend, BackendRequest, BackendSink, BackendStream
from kilnproxy.backends.local import LocalBackend
from kilnproxy.directory.model import Route, parse_backend_url


class Backends:
    """One Backend object per (name, URL), made on first use and kept for the worker's life."""

    def __init__(self, state_dir: Path) -> None:
        self._state_dir = state_dir
        self._by_key: dict[tuple[str, str], Backend] = {}

    def for_route(self, route: Route) -> Backend:
        key = (route.backend, route.backend_url)
        backend = self._by_key.get(key)
        if backend is None:
            url = parse_backend_url(route.backend_url)
            backend = LocalBackend(route.backend, Path(url.base), self._state_dir)
            self._by_key[key] = backend
        return backend

    async def close(self) -> None:
        for backend in self._by_key.values():
            await backend.close()
        self._by_key.clear()


__all__ = ["Backend", "BackendRequest", "BackendSink", "BackendStream", "Backends"]
