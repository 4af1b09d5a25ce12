"""What every experiment writes and where: its CSVs, its PNG, and the ``--out`` / ``--plot`` / ``--quick`` defaults.

A full run writes ``experiments/results/<name>.csv`` and ``docs/img/<name>.png`` (the committed results); a
``--quick`` smoke run writes into a fresh temporary folder, so it never overwrites them. Every file is written to
a temporary name beside its target and renamed into place (:mod:`jaxdp.atomic`): a run killed mid-write leaves
the old file, never a half-written one.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import tempfile
from collections.abc import Sequence
from typing import Any

from jaxdp import atomic
from jaxdp.cli_args import file_problem, folder_problem

ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Adds ``--out`` (the CSV folder) and ``--plot`` (the PNG path) for the experiment ``name``."""
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder for the CSVs (default experiments/results; --quick: a temporary folder)")
    parser.add_argument("--plot", type=pathlib.Path, default=None,
                        help=f"PNG path (default docs/img/{name}.png; --quick: in the --out folder)")


def parse_quick(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                quick: dict[str, Any]) -> argparse.Namespace:
    """Parses ``argv``; with ``--quick``, ``quick``'s values replace the parser's defaults, so an option given beside
    ``--quick`` still wins (``--quick --workers 1 4`` runs N in {1, 4}, the rest of the smoke run's sizes)."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def resolve(args: argparse.Namespace, name: str, parser: argparse.ArgumentParser) -> None:
    """Fills in ``args.out`` and ``args.plot`` where the command line left them out (see the module docstring), and
    refuses, through ``parser.error``, paths the results could not be written to: before the work, not after it."""
    problem = ((args.out and folder_problem(str(args.out), "--out"))
               or (args.plot and file_problem(str(args.plot), "--plot", "the PNG")))
    if problem:
        parser.error(problem)
    if args.quick:
        args.out = args.out or pathlib.Path(tempfile.mkdtemp(prefix=f"jaxdp_{name}_quick_"))
    args.out = args.out or ROOT / "experiments" / "results"
    args.plot = args.plot or (args.out / f"{name}.png" if args.quick else ROOT / "docs" / "img" / f"{name}.png")


def write_csv(path: pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` (dicts with the same keys, in column order) as a CSV with a header."""
    if not rows:
        raise ValueError(f"write_csv: no rows for {path}")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic.replace_file(path, write)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (experiments run on machines with no screen)."""
    import matplotlib  # noqa: PLC0415 -- only the plotting step needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig, path: pathlib.Path, dpi: int = 110) -> None:
    """Saves ``fig`` as a PNG at ``path`` and closes it."""
    try:
        atomic.replace_file(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        pyplot().close(fig)
