"""The exit statuses of every ef21 command, in one place (the docs' configuration page lists them)."""

EXIT_OK = 0
"""The run ended as asked (a worker: the master said so, by its Stop or when the worker came back to it)."""
EXIT_FAILED = 1
"""The run failed (a worker's error the master could not recover from, a checkpoint it could not write); a worker
refused by the master, or one whose master broke the protocol."""
EXIT_USAGE = 2
"""Bad input: a flag, a file, a configuration; one line on stderr says which. Also a worker whose objective the
master refused at set-up as not fitting the run (another d, another model), or one whose master speaks another
protocol version: starting it again would not help."""
EXIT_DIVERGED = 3
EXIT_JOIN_TIMEOUT = 4
"""The other side never came: the master's workers within ``--join-timeout``, or a worker's master within
``--connect-timeout`` (at the start, or after the worker lost it during the run)."""
