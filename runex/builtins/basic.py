"""Built-in `range` source and `null` sink, for trying pipelines out and for benchmarks."""

from collections import deque

from runex import DataSourceSpec, SinkSpec


def range_partitions(stop, start=0, size=1000):
    if size < 1:
        raise ValueError("size must be at least 1")
    return ([i, min(i + size, stop)] for i in range(start, stop, size))  # as they are read


def read_range(partition, field="n"):
    low, high = partition
    return ({field: i} for i in range(low, high))


def write_null(ctx, records):
    deque(records, maxlen=0)  # run everything, keep nothing


def range_fingerprint(partition):
    """A range's numbers are its key: the same key, the same input."""
    return partition


range_source = DataSourceSpec(name="range", partitions=range_partitions, read=read_range,
                              fingerprint=range_fingerprint)
null_sink = SinkSpec(name="null", write=write_null, configure=lambda: {})
