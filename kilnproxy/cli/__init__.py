"""The `kilnproxy` command: argument parsing, the admin commands, the demo seed, the status view.
Rule: bad input is one line and exit status 2, never a traceback.
"""
