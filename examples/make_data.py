"""Regenerate examples/data/: a seeded log of hourly readings from 40 weather stations,
one CSV file per station group (about 1% of the rows have a missing value)."""

import csv
import datetime
import math
import pathlib
import random

OUT = pathlib.Path(__file__).parent / "data"
FILES, ROWS = 16, 500

rng = random.Random(2026)
stations = [f"station-{n:03d}" for n in range(40)]
OUT.mkdir(exist_ok=True)
start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
for f in range(FILES):
    with open(OUT / f"readings-{f:02d}.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["station", "time", "temperature", "humidity"])
        for i in range(ROWS):
            hour = start + datetime.timedelta(hours=f * ROWS + i)
            season = -math.cos(2 * math.pi * hour.timetuple().tm_yday / 365)
            temperature = round(12 + 14 * season + rng.gauss(0, 4), 1)
            humidity = round(min(100.0, max(5.0, rng.gauss(65, 15))), 1)
            row = [rng.choice(stations), hour.isoformat(), temperature, humidity]
            if rng.random() < 0.01:
                row[rng.choice([2, 3])] = ""
            writer.writerow(row)
