"""Errors that mean "the user must fix something": the CLI prints them on one line and exits 2."""


class UserError(Exception):
    """Bad input (files, options, configs). The message says what to fix."""
