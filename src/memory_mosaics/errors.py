"""Typed exceptions: every error a user can cause by what they pass in is one of these."""


class MosaicError(Exception):
    """Base class for errors caused by bad input (files, configs, arguments)."""


class ConfigError(MosaicError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class CheckpointError(MosaicError):
    """A checkpoint folder is missing, corrupt, or its config and weights disagree."""


class NumericalFaultError(MosaicError):
    """Training met too many steps in a row with a non-finite loss or gradient, and stopped."""
