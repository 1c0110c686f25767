"""Kernels of the bundled example, examples/readings.toml: clean weather-station readings,
replace station names by salted pseudonyms (a deliberately slow, CPU-bound hash), classify."""

import hashlib

from runex import register_kernel


@register_kernel("parse_reading")
def parse_reading(record):
    """Typed values; a reading with a missing or malformed value is dropped."""
    try:
        return {
            "station": record["station"],
            "time": record["time"],
            "temperature": float(record["temperature"]),
            "humidity": float(record["humidity"]),
        }
    except (KeyError, ValueError):
        return None


@register_kernel("pseudonymize")
def pseudonymize(record, field="station", rounds=1500, salt="runex-example"):
    """Replace `field` by a salted PBKDF2 digest: the same name always gives the same
    pseudonym, and reversing it means hashing every candidate `rounds` times."""
    digest = hashlib.pbkdf2_hmac("sha256", record[field].encode(), salt.encode(), rounds)
    return {**record, field: digest.hex()[:16]}


@register_kernel("classify", batch=True)
def classify(records, hot=30.0, humid=80.0):
    """A batch kernel: label each reading, from a list in to an iterable out."""
    for r in records:
        label = "hot" if r["temperature"] >= hot else "cold" if r["temperature"] < 0 else "mild"
        if r["humidity"] >= humid:
            label += "+humid"
        yield {**r, "label": label}
