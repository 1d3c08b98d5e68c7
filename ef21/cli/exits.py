"""The exit statuses of every ef21 command, in one place (the docs' configuration page lists them)."""

EXIT_OK = 0
EXIT_FAILED = 1
"""The run failed (a worker's error the master could not recover from, a checkpoint it could not write)."""
EXIT_USAGE = 2
"""Bad input: a flag, a file, a configuration; one line on stderr says which."""
EXIT_DIVERGED = 3
EXIT_JOIN_TIMEOUT = 4
"""The workers did not all come within ``--join-timeout``."""
