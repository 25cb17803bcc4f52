"""Data sources -> one `Interactions` value: MovieLens by name, any CSV/TSV/Parquet, the synthetic generator.

`read_frame` gives the canonical frame (what the validation suite checks), `to_interactions` turns it
into the index-space value, `load_interactions` does both with the value checks in between.
"""

from mfpipe.data.interactions import Interactions
from mfpipe.data.loader import load_interactions, read_frame, synthetic_size, to_interactions

__all__ = ["Interactions", "load_interactions", "read_frame", "synthetic_size", "to_interactions"]
