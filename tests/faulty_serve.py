"""`kilnproxy serve` with one injected fault, for the isolation test only.

Opening the repository `aviato/boom` raises inside the session's setup, as a bug of ours would.
The fault lives in this test file, so no client can trigger it in production.
"""

from __future__ import annotations

import sys

from kilnproxy.backends import BackendRequest, BackendSink, BackendStream
from kilnproxy.backends.local import LocalBackend
from kilnproxy.cli import main

_real_open = LocalBackend.open


async def _faulty_open(
    self: LocalBackend, request: BackendRequest, sink: BackendSink
) -> BackendStream:
    if request.route.repo == "aviato/boom":
        raise RuntimeError("injected fault for the isolation test")
    return await _real_open(self, request, sink)


LocalBackend.open = _faulty_open  # type: ignore[method-assign]
sys.exit(main())
