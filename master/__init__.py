"""The pre-fork master (SPEC 6): sockets, worker processes, signals, status socket, sd_notify.

    arbiter      the process: wires the pieces below together and runs them (`serve`)
    supervisor   workers, signals, reconciling, heartbeats (with `workers`, `liveness`,
                 `sockets`, `notify`); feeds the board, serves `actions.WorkerActions`
    board        the read side: connection table (`table`), memory (`history`), totals, restarts
    status, http, metrics   its readers: the status socket, the status page, Prometheus

Imports point one way: arbiter -> supervisor, readers -> board -> workers, liveness; readers
reach the supervisor only through the `actions` Protocol. It must never import asyncssh, and of
kilnproxy only the shared top level (config, errors, logs, version, control, status_socket):
workers are separate interpreters (fork+exec), known through their process and the typed
`kilnproxy.control` messages on their socketpair.
"""
