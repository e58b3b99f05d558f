"""Injected faults, for tests only: put this directory on PYTHONPATH.

Python imports `sitecustomize` at start-up, so every worker process the master fork+execs picks
this up. The faults live in the tests: no client can trigger them. In a worker:
- opening the repository `aviato/boom` raises inside the session's setup, as a bug of ours would;
- KILNPROXY_TEST_CRASH_AFTER_READY: the worker dies half a second after it said READY;
- KILNPROXY_TEST_CHANNEL_HELD=PATH: the first worker to say READY leaves a `sleep` holding its
  end of the control channel, writes that pid to PATH, and dies half a second later (the
  channel outlives its worker);
- KILNPROXY_TEST_BOOT_FAILS_WHILE=PATH: a worker cannot boot while PATH exists (its host keys
  fail to load, as in a deploy under way);
- KILNPROXY_TEST_ASYNCSSH_VERSION: asyncssh says it is that version (the fast path's guard).

In the master (`kilnproxy serve`), KILNPROXY_TEST_SLOTS=N makes the startup table's least size
N rather than 64, so that a test can hold every slot with a few workers.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

if "kilnproxy.worker.process" in sys.orig_argv:
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

    if os.environ.get("KILNPROXY_TEST_BOOT_FAILS_WHILE"):
        import asyncssh

        import kilnproxy.ssh.server
        from kilnproxy.errors import OperatorError

        _real_load = kilnproxy.ssh.server.load_host_keys

        def _load_unless_broken(paths: tuple[Path, ...]) -> list[asyncssh.SSHKeyPair]:
            if os.path.exists(os.environ["KILNPROXY_TEST_BOOT_FAILS_WHILE"]):
                raise OperatorError("host key: injected failure (a deploy under way)")
            return _real_load(paths)

        kilnproxy.ssh.server.load_host_keys = _load_unless_broken  # before the worker imports it

    if os.environ.get("KILNPROXY_TEST_ASYNCSSH_VERSION"):
        import asyncssh

        asyncssh.__version__ = os.environ["KILNPROXY_TEST_ASYNCSSH_VERSION"]

    if os.environ.get("KILNPROXY_TEST_CRASH_AFTER_READY"):
        from kilnproxy.control import Channel, Message

        _real_send = Channel.send

        def _send_then_crash(self: Channel, message: Message) -> None:
            _real_send(self, message)
            if message.kind.value == "ready":
                asyncio.get_running_loop().call_later(0.5, os._exit, 1)

        Channel.send = _send_then_crash  # type: ignore[method-assign]

    if os.environ.get("KILNPROXY_TEST_CHANNEL_HELD"):
        import subprocess

        from kilnproxy.control import Channel, Message

        _real_send = Channel.send

        def _send_then_leave_a_holder(self: Channel, message: Message) -> None:
            _real_send(self, message)
            if message.kind.value != "ready":
                return
            try:  # the first worker only: its replacements serve
                fd = os.open(
                    os.environ["KILNPROXY_TEST_CHANNEL_HELD"], os.O_CREAT | os.O_EXCL | os.O_WRONLY
                )
            except FileExistsError:
                return
            channel = self._writer.get_extra_info("socket").fileno()
            holder = subprocess.Popen(["sleep", "60"], pass_fds=(channel,), start_new_session=True)
            os.write(fd, str(holder.pid).encode())
            os.close(fd)
            asyncio.get_running_loop().call_later(0.5, os._exit, 1)

        Channel.send = _send_then_leave_a_holder  # type: ignore[method-assign]

if os.environ.get("KILNPROXY_TEST_SLOTS") and "serve" in sys.orig_argv:
    import master.admission

    master.admission.MIN_SLOTS = int(os.environ["KILNPROXY_TEST_SLOTS"])  # before arbiter's import
