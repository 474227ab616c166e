"""How the CSV reader scales with one long multi-line quoted field: seconds per size and their ratios.

Usage::

    .venv/bin/python -m benchmarks.long_field                      # 250 kB, 500 kB, 1 MB
    .venv/bin/python -m benchmarks.long_field --sizes 250000 1000000

Writes, per size, an encounter extract whose admission note is a quoted field
of that many characters spread over physical lines (about one per 45
characters) and holding doubled quotes, then reads it with
:func:`jobs.readers.csv.read_csv_file` in one warm Spark session (a first,
small read warms it) and collects its bronze rows. Prints seconds per size and
the ratio of each time to the first size's: a reader linear in the field's
length gives ratios close to the size ratios (4 for 1 MB against 250 kB), a
quadratic one their squares. Up to about 1 MB, Spark's fixed cost per read
(seconds) weighs more than the field's length, so ratios near 1 are what a
linear reader shows there. Figures only, nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.core.settings import PROJECT_ROOT  # noqa: E402

DEFAULT_SIZES = (250_000, 500_000, 1_000_000)
ESTABLISHMENT = "chu_laurentides"
HEADER = "no_sejour;no_dossier;date_debut;date_fin;type_sejour;unite;note_admission;action"
PARAGRAPH = 'Patient admis; douleur "thoracique" irradiant au bras gauche.\nAntécédents: HTA; diabète.\n'


def say(message: str) -> None:
    print(f"[long-field] {message}", flush=True)


def write_extract(folder: Path, note_chars: int) -> Path:
    """An encounter extract: one record with a quoted note of ``note_chars`` characters, one short record."""
    note = (PARAGRAPH * (note_chars // len(PARAGRAPH) + 1))[:note_chars].rstrip() + "."
    quoted = '"' + note.replace('"', '""') + '"'
    rows = [HEADER,
            f"S1;L001;03/01/2026 08:00;04/01/2026 12:30;hospitalisation;Médecine;{quoted};A",
            "S2;L002;05/01/2026 08:00;;urgence;Urgence;;A"]
    path = folder / f"sejours-{note_chars}.csv"
    path.write_bytes("\r\n".join(rows).encode("latin-1") + b"\r\n")
    return path


def measure(sizes: list[int]) -> list[tuple[int, float]]:
    from jobs.core.config import load_consortium
    from jobs.readers.csv import FileLineage, read_csv_file
    from jobs.core.session import get_spark
    from jobs.core.settings import Settings

    profile = load_consortium(PROJECT_ROOT / "config").establishments[ESTABLISHMENT].input
    lineage = FileLineage(ESTABLISHMENT, "bench", f"{ESTABLISHMENT}/bench/sejours.csv",
                          dt.datetime(2026, 1, 5, 2), dt.datetime(2026, 1, 5, 3))
    timings = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        spark = get_spark(Settings.from_env(lake_root=str(folder / "lake")), app_name="affluent-long-field")
        try:
            for note_chars in [1_000, *sizes]:
                path = write_extract(folder, note_chars)
                started = time.perf_counter()
                landed = read_csv_file(spark, path, "encounter", profile, lineage).bronze["encounter"].collect()
                seconds = time.perf_counter() - started
                if len(landed) != 2:
                    raise RuntimeError(f"{path.name}: {len(landed)} records landed, 2 expected")
                if note_chars in sizes:
                    timings.append((note_chars, seconds))
                    say(f"{note_chars:>10,} characters: {seconds:7.2f} s")
        finally:
            spark.stop()
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.long_field", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="note lengths in characters, smallest first")
    args = parser.parse_args(argv)
    timings = measure(sorted(args.sizes))
    first_chars, first_seconds = timings[0]
    for note_chars, seconds in timings:
        say(f"{note_chars:>10,} / {first_chars:,}: size ×{note_chars / first_chars:.1f}, "
            f"time ×{seconds / first_seconds:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
