"""What every rear_ds command line shares: help that keeps the usage examples as written and shows defaults;
progress bars; integer arguments with a lower bound (counts, sizes).

Each command is both ``python -m rear_ds.<module>`` (or a script path) and, after ``pip install -e .``, an
installed command (``rear-sample``, ... in pyproject.toml); its usage line names the one it was started as.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description keeps its line breaks (usage examples with their ``\\`` continuations); options show
    their defaults, except where there is nothing to show (None, off flags) or the help already says it."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == ""  # (0 is a default)
        if nothing or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(doc: str, prog: str, command: str = "", epilog: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with :class:`HelpFormatter`, ``doc`` as its description, and ``command`` as its name when
    started as that installed command (else ``prog``, e.g. "python -m rear_ds.sample")."""
    started_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return argparse.ArgumentParser(prog=command if command and started_as == command else prog, description=doc,
                                   epilog=epilog or None, formatter_class=HelpFormatter)


def int_at_least(minimum: int):
    """argparse type for counts and sizes: argparse's error then names the flag, the value and what it must be
    (a batch size of 0 once ended in "range() arg 3 must not be zero", a limit of -1 dropped an image)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def progress(total: Optional[int], desc: str, disable: bool = False, unit: str = "img"):
    """A tqdm bar on stderr, redrawn every second on a terminal and every 30 s into a file (a Slurm log)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=disable, dynamic_ncols=True, file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0)
