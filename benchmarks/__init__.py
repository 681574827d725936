"""lpcam's benchmarks, installed as ``lpcam_benchmarks``: ``lpcam bench NAME [arguments]`` runs one
(``python benchmarks/NAME.py`` in a checkout of the repository does the same)."""
