"""Errors and load reports: how data problems are told to the user.

A data set problem must never be a silent drop nor a bare traceback from deep inside PIL or
pyarrow. Every problem found while loading is turned into a :class:`Problem` that names the
file (and line) and says what to do; with ``on_bad_image="error"`` the first one is raised as a
:class:`DatasetFormatError`, with ``"skip"`` all of them are collected in a :class:`LoadReport`
that is logged at the end and attached to the returned ``DatasetDict`` as ``.load_report``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

logger = logging.getLogger("data_scripts")

ON_BAD_CHOICES = ("error", "skip")


class DatasetFormatError(ValueError):
    """A data set on disk is malformed or incomplete; the message says which file and what to do."""


@dataclass(frozen=True)
class Problem:
    """One bad input: where it is, what is wrong, and what the user can do about it."""

    file: str
    message: str
    line: Optional[int] = None
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}, line {self.line}" if self.line is not None else self.file
        text = f"{where}: {self.message}"
        return f"{text}. {self.hint}" if self.hint else text


@dataclass
class LoadReport:
    """What a loader found, used, skipped and noticed.

    ``skipped`` holds problems that removed data (only with ``on_bad_image="skip"``);
    ``notes`` holds facts worth knowing that removed nothing the split needs (e.g. captions for
    an image that is in no split file and missing on disk, byte-identical images).
    """

    source: str
    layout: str
    found: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, ...]] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> str:
        """A human-readable multi-line account, suitable for logs and the summary command."""
        lines = [f"source: {self.source}", f"layout: {self.layout}"]
        lines += [f"  found {name}: {path}" for name, path in self.found.items()]
        lines += [f"  missing: {item}" for item in self.missing]
        for split, c in self.counts.items():
            lines.append(f"  {split}: {c.get('images', 0)} images, {c.get('pairs', 0)} captions")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad input(s):")
            lines += [f"    - {p}" for p in self.skipped]
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {n}" for n in self.notes]
        return "\n".join(lines)

    def log(self) -> None:
        """Log at warning level when something was skipped or noticed, else at info level."""
        level = logging.WARNING if (self.skipped or self.notes) else logging.INFO
        logger.log(level, "Loaded data set\n%s", self.summary())


class ProblemSink:
    """Applies the ``on_bad_image`` policy: raise the first problem, or collect them all."""

    def __init__(self, on_bad: str, report: LoadReport):
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_CHOICES}, got {on_bad!r}")
        self.on_bad = on_bad
        self.report = report

    def __call__(self, problem: Problem) -> None:
        if self.on_bad == "error":
            raise DatasetFormatError(
                f"{problem} (pass on_bad_image='skip' to skip such inputs and get a report)"
            )
        self.report.skipped.append(problem)
