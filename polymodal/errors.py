"""Errors that are the user's to fix: the CLI prints their message and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (a path, a name, a config field); its message is one line."""


class ConfigError(UserError):
    """A config field that is unknown, missing or of the wrong type; the message names the field."""
