"""synseg-data: from a CC12M-style URL list to labelled WebDataset shards.

One module per stage (``download``, ``nouns``, ``filter``, ``pack``, ``inspect``), each with a
``run_<stage>(config) -> stats`` function; ``cli`` is a thin Typer layer over them; ``world``
generates the offline synthetic world that every stage can run on.
"""

__version__ = "0.1.0"
