"""Errors shared by every layer. This module imports nothing of the package, so the config and the
registries (tasks, methods) can both raise `ConfigError` without importing each other."""


class ConfigError(ValueError):
    """A job file or override that cannot be run; the message names the key and what was expected."""
