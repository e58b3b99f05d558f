"""The pre-fork master (SPEC 6): sockets, worker processes, signals, status socket, sd_notify.

It must never import asyncssh: workers are separate interpreters (fork+exec), and the master
only knows them through their process and the `kilnproxy.control` messages on their socketpair.
"""
