"""What both stages share, and neither owns: the one user-error type (``errors``), atomic files
and rerun records (``fsutil``), default process counts (``cores``), the command lines' console,
error handler and progress bars (``console``), and the contract between ``pack`` and the
trainer (``shards``). The toolkit's version is written here once (``pyproject.toml`` reads it).
"""

__version__ = "0.1.0"
