"""The command line's building blocks: flags, config files, progress, plots and the run log.

- ``args``: the flags of a run configuration (shared by ``simulate``, ``master`` and ``run``).
- ``configfile``: ``--config FILE.toml`` for every command, and the effective configuration a command prints.
- ``commands``: the ``simulate`` and ``plot`` subcommands.
- ``progress``, ``plotting``, ``runlog``: the progress bar, the figures, the JSONL log.

May import: ``ef21.engine`` and everything below it. The ``ef21`` command itself (``ef21/__main__.py``) puts these
subcommands together with ``ef21 experiment`` and the service's ``master``, ``worker``, ``run`` and ``status``.
"""
