"""Job inputs and outputs: sources read by workers from shard descriptors, and the sink
(part files, manifest, resume, the output lock, repair, reading results back).

Only this package and :mod:`distjac.arrow` touch Arrow; this package reads and writes files.
"""

from .sink import (
    Manifest,
    PartInfo,
    clean_temporaries,
    file_checksum,
    inspect_output,
    iter_result,
    lock_output,
    open_output,
    part_name,
    read_result,
    repair_output,
    write_part,
)
from .sources import ArrowSource, NpySource, ParquetSource, Source, SyntheticSource, TensorSource, open_source

__all__ = [
    "ArrowSource",
    "Manifest",
    "NpySource",
    "ParquetSource",
    "PartInfo",
    "Source",
    "SyntheticSource",
    "TensorSource",
    "clean_temporaries",
    "file_checksum",
    "inspect_output",
    "iter_result",
    "lock_output",
    "open_output",
    "open_source",
    "part_name",
    "read_result",
    "repair_output",
    "write_part",
]
