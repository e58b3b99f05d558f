"""One injected fault, for the isolation test only: put this directory on PYTHONPATH.

Python imports `sitecustomize` at start-up, so every worker process the master fork+execs picks
this up. In a worker, opening the repository `aviato/boom` raises inside the session's setup,
as a bug of ours would. The fault lives in the tests, so no client can trigger it in production.
"""

from __future__ import annotations

import sys

if "kilnproxy.worker_process" in sys.orig_argv:
    from kilnproxy.backends import BackendRequest, BackendSink, BackendStream
    from kilnproxy.backends.local import LocalBackend

    _real_open = LocalBackend.open

    async def _faulty_open(
        self: LocalBackend, request: BackendRequest, sink: BackendSink
    ) -> BackendStream:
        if request.route.repo == "aviato/boom":
            raise RuntimeError("injected fault for the isolation test")
        return await _real_open(self, request, sink)

    LocalBackend.open = _faulty_open  # type: ignore[method-assign]
