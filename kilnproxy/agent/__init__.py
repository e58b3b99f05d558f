"""The storage agent (`kilnproxy agent`, SPEC 5): the far end of agent:// backends.

It runs on a storage server, accepts TLS 1.3 connections from proxies whose certificates its CA
signed, and runs for them exactly what a local backend runs (`backends.local`), confined to its
base directory. It must never import the proxy's SSH stack, its workers or its directory: it
knows a proxy only by the frames of `backends.frames`.
"""
