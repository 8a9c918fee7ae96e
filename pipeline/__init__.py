"""synseg-data: from a CC12M-style URL list to labelled WebDataset shards.

One module per stage (``download``, ``nouns``, ``filter``, ``pack``, ``inspection``), each with a
``run_<stage>(config) -> stats`` function; ``cli`` is a thin Typer layer over them; ``world``
generates the offline synthetic world that every stage can run on. What the stages share with
the trainer (errors, atomic files, cores, the console, the shard contract) is ``synseg``'s.
"""
