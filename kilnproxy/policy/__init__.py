"""The pure policy core: the command grammar, path rules and access decisions (SPEC 3).

Plain functions over plain data. Rule: nothing here does I/O or imports anything of kilnproxy
but `errors`, so every rule is unit-tested without a socket.
"""
