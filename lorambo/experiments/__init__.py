"""Experiments on the real all-MiniLM-L6-v2 with real English text, all offline."""
