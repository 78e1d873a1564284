"""Routing policies: the interface (``base.py``), the simple ones (``simple.py``), the
cache-aware one (``cache_aware.py`` over ``radix_tree.py``, keyed by ``text_key.py``), and
``registry.py`` mapping a ``--policy`` name to a class."""
