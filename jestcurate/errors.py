"""Errors that reach the user as one line, never as a traceback."""


class JCError(Exception):
    """Bad input or an impossible request: the CLI prints the message and exits with code 2."""
