"""An extension: a plain .py file in extensions/, loaded by every runex command and worker.
Register kernels with @register_kernel or a KERNELS dict; sources and sinks as module-level
DataSourceSpec and SinkSpec instances. `runex extensions` lists what loaded."""

from runex import register_kernel


@register_kernel("lower")
def lower(record, field="text"):
    """A per-record kernel: return a record, or None to drop it."""
    text = record[field].strip().lower()
    return {**record, field: text} if text else None


@register_kernel("words", batch=True)
def words(records, field="text", min_length=1):
    """A batch kernel: a list of records in, an iterable of records out."""
    for record in records:
        for word in record[field].split():
            word = word.strip(".,;:!?\"'()")
            if len(word) >= min_length:
                yield {"word": word}


KERNELS = {
    "strip": lambda record: {k: v.strip() if isinstance(v, str) else v for k, v in record.items()},
}
