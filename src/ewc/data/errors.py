"""Exceptions raised by :mod:`ewc.data`."""

from __future__ import annotations

__all__ = ["DataError", "DownloadError"]


class DataError(ValueError):
    """A data file is missing, malformed or inconsistent.

    The message names the file and says what is wrong with it and how to fix it.
    """


class DownloadError(DataError):
    """A download failed: the network was unreachable, or the server or checksum said no.

    Nothing is left under the final file name when this is raised; the message names the URLs
    tried, and the underlying error is chained as ``__cause__``.
    """
