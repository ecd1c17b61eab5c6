#!/usr/bin/env python
"""Draw the book's figures into book/figures/ as SVG (syndiff_lib/figures.py).

    python scripts/draw_figures.py              # the published book's profile (cpu)
    python scripts/draw_figures.py --out /tmp/figures

Every file is the same, byte for byte, on every run with the same library versions (fixed
SVG ids, no date), so the committed figures can be checked against the code:
tests/test_figures.py draws them again and compares. Rerun this script, and commit what it
writes, whenever the architecture, a profile or the schedule changes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no window

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the library

from syndiff_lib.figures import BOOK_PROFILE, draw_all  # noqa: E402  (after the backend and the path)

FIGURES_DIR = REPO / "book" / "figures"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(FIGURES_DIR), help="folder to write (default: book/figures/)")
    parser.add_argument("--profile", default=BOOK_PROFILE,
                        help=f"the profile whose shapes the architecture shows (default: {BOOK_PROFILE})")
    args = parser.parse_args(argv)
    for path in draw_all(args.out, args.profile):
        path = path.resolve()
        print(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
