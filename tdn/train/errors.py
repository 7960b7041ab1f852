"""Errors of the training side."""


class ConfigError(ValueError):
    """A configuration that cannot work, found before training starts."""
