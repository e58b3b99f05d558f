"""The worker process (SPEC 6): adopts the inherited sockets, serves SSH with a `Worker`, and
speaks the control protocol to its master. Rule: it knows nothing of supervision beyond the
messages of `kilnproxy.control`.
"""
