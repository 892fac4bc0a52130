"""Local training: the one SGD loop (local.py) and the client losses (losses.py)."""
