"""Data sources -> one `Interactions` value: MovieLens by name, any CSV/TSV/Parquet, the synthetic generator.

`read_frame` gives the canonical frame (what the validation suite checks) and `to_interactions` turns it
into the index-space value; `mfpipe.prepare` chains them with validation and the split.
"""

from mfpipe.data.interactions import Interactions
from mfpipe.data.loader import dataset_name, read_frame, synthetic_size, to_interactions

__all__ = ["Interactions", "dataset_name", "read_frame", "synthetic_size", "to_interactions"]
