"""Errors that reach a user as one line, not a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a configuration): the CLI prints it and exits with status 2."""


class DivergenceError(Exception):
    """The iterates stopped being finite or exploded: the run ends with a clear message and its log kept."""
