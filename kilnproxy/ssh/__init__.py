"""The SSH surface of a worker: the asyncssh server, one `Session` per connection, one `Relay`
per channel, and the key and signature policy. Rule: it never imports `cli` or `worker`; what
it needs of the worker arrives as a `Services` record.
"""
