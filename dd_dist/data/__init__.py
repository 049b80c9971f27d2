"""The data plane: every source (built-in, hf:, image folders) written once to a Parquet cache
(cache.py) and read row by row from it (splits.py), decoded and transformed where read (transforms.py)."""
