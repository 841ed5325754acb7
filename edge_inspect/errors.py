"""The error hierarchy: every error the user can fix is an ``EdgeInspectError``.

Messages say what was expected, what was found and what to do about it. The
CLI prints them as ``Error: ...`` on stderr and exits 1; ``--debug`` adds the
traceback.

    >>> raise InputError("No readable image in 'parts/'. Expected png, jpg, ...")
"""


class EdgeInspectError(Exception):
    """Base class of the errors the user can act on."""


class ConfigError(EdgeInspectError):
    """A setting, flag or configuration file value is wrong.

    Attributes:
        key: the configuration key at fault (``"sources.line2.settle"``),
            when one is; the CLI names the flag instead where the user typed
            one.
    """

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class ModelCardError(EdgeInspectError):
    """A run folder or model folder is missing, incomplete or inconsistent."""


class InputError(EdgeInspectError):
    """An image, folder or data set cannot be used as given."""


class SourceError(EdgeInspectError):
    """A hot folder or camera cannot be read."""


class MissingExtraError(EdgeInspectError):
    """A command needs an optional dependency group that is not installed."""


class LedgerGoneError(InputError):
    """The ledger file was deleted, renamed or replaced while a watcher had it open."""


class LedgerDamagedError(InputError):
    """The ledger file is an SQLite file that SQLite finds damaged (pages overwritten, truncated, ...)."""


class DeliveryError(EdgeInspectError):
    """A network sink's receiver (broker, PLC, webhook) did not take a verdict; the outbox retries it."""
