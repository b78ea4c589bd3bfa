"""Reports: tables and figures derived from a sweep journal.

:func:`build_report` reads a journal and writes, per sweep, into ``out_dir/<sweep>/`` (the sweep's name made
file-name safe; names that would share a folder get a suffix, see :func:`_folders`):

* ``results.md`` / ``results.csv`` -- Table 1/2 style (best-mean sweeps: a row per setting,
  a column per method, original and ground-truth columns) or the frontier points of
  every method (Pareto sweeps, rebuttal-table style);
* ``hyperparameters.md`` / ``.csv`` -- the winning hyperparameters of every method;
* ``runtime.md`` / ``.csv`` -- seconds per trial / epoch of the selected settings;
* ``frontier[_<setting>].png`` -- Figure 2-style fronts (two or more metrics);

and ``out_dir/index.md`` linking everything, with notes (excluded settings, failures).

Other layers add sections to a sweep's folder through ``sections`` (e.g. the privacy columns of
:func:`overunlearn.privacy.columns.privacy_section`, which train models: a report itself never does).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from overunlearn.errors import OverunlearnError
from overunlearn.report.aggregate import SettingResult, SweepReport, load
from overunlearn.report.figures import frontier_plot
from overunlearn.report.tables import (
    dominance_table,
    frontier_table,
    hyperparameter_table,
    results_table,
    runtime_table,
)
from overunlearn.storage import atomic_write_text, stable_hash
from overunlearn.sweep.journal import JournalContents

__all__ = ["build_report", "load", "frontier_plot", "SettingResult", "SweepReport", "ReportSectionError", "Section"]


class SectionResult(Protocol):
    """What a section wrote (``files``), what it wants said in ``index.md`` (``notes``), what failed."""

    files: list[Path]
    notes: list[str]
    failures: list[str]


#: ``section(report, journal_contents, folder) -> SectionResult``: adds files to a sweep's report folder
Section = Callable[[SweepReport, JournalContents, Path], SectionResult]


class ReportSectionError(OverunlearnError, RuntimeError):
    """A section failed for some settings; everything else of the report was written.

    Attributes:
        failures: one message per failed setting (``sweep [setting]: reason``).
        files: every file the report wrote.
    """

    def __init__(self, failures: list[str], files: list[Path]) -> None:
        super().__init__("not computed for " + "; ".join(failures))
        self.failures = failures
        self.files = files


def _slug(text: str) -> str:
    """A file-name-safe version of ``text`` that stays inside the folder it is joined to (never ``.``/``..``)."""
    s = re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_")
    if not s.strip("."):
        s = s.replace(".", "_")
    return s or "default"


def _folders(names: list[str]) -> dict[str, str]:
    """A distinct folder name per sweep name; deterministic (the same for the same names in any order).

    A name's folder is its :func:`_slug`. Names whose slugs collide (``"run 1"`` and ``"run_1"``; also
    names differing only in case, which are one folder on macOS and Windows) would overwrite each
    other's files: of such a group, only a name that is its own slug keeps it (the first in sorted
    order, if several), every other name gets ``<slug>-<hash of the name>``.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_slug(name).casefold(), []).append(name)
    out: dict[str, str] = {}
    for group in groups.values():
        plain = min((n for n in group if n == _slug(n)), default=None) if len(group) > 1 else group[0]
        for name in group:
            out[name] = _slug(name) if name == plain else f"{_slug(name)}-{stable_hash(name, 8)}"
    return out


def build_report(journal: str | Path, out_dir: str | Path | None = None, *, allow_partial: bool = False,
                 sweeps: list[str] | None = None, figures: bool = True,
                 sections: Sequence[Section] = (), select_seeds: list[int] | None = None,
                 warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write tables and figures for every sweep in ``journal``; return the files written.

    ``warn`` receives every journal warning (skipped lines, conflicting duplicates, mixed provenance);
    they are also listed in ``index.md``.

    ``select_seeds``: pick hyperparameters on these seeds, report on the others (see :func:`load`).
    ``sections``: more sections per sweep (e.g. the privacy columns, see ``docs/privacy.md``). Settings
    where a section fails are named in ``index.md``; after everything else is written,
    :class:`ReportSectionError` (with ``.files``) is raised.
    """
    journal = Path(journal)
    if not journal.exists():
        raise FileNotFoundError(f"journal {str(journal)!r} does not exist; run `overunlearn sweep SPEC` first")
    out = Path(out_dir) if out_dir is not None else journal.with_name(journal.stem + "_report")
    reports, contents = load(journal, allow_partial=allow_partial, sweeps=sweeps, select_seeds=select_seeds)
    if warn is not None:
        for msg in contents.warnings() + [n for rep in reports for n in rep.notes if n.startswith("mixed provenance")]:
            warn(msg)
    written: list[Path] = []
    section_failures: list[str] = []
    index = [f"# Report for `{journal}`", ""]
    if contents.warnings():
        index.append(f"Journal warnings ({len(contents.warnings())}):\n")
        index += [f"- {w}" for w in contents.warnings()[:50]] + [""]
    if not reports:
        index.append("The journal holds no trials yet.")
    folders = _folders([rep.name for rep in reports])
    for rep in reports:
        d = out / folders[rep.name]
        index += [f"## {rep.name}: {rep.title}" + (f" ({rep.paper})" if rep.paper else ""), ""]
        if not rep.settings:
            index += ["No finished trials yet.", ""]
            continue
        by_sel = {"best_mean": [s for s in rep.settings if s.selection == "best_mean"],
                  "pareto": [s for s in rep.settings if s.selection == "pareto"]}
        if by_sel["best_mean"]:
            md, csv = results_table(by_sel["best_mean"])
            written += _pair(d / "results", md, csv, f"{rep.title}: results")
        if by_sel["pareto"]:
            md_all, csv_all = [], []
            for s in by_sel["pareto"]:
                md, csv = frontier_table(s)
                md_all.append(f"### {s.title or s.setting or rep.name}\n\n{md}")
                csv_all.append(csv if not csv_all else csv.split("\n", 1)[1])
                if figures and len(s.metrics) >= 2:
                    fname = f"frontier_{_slug(s.setting)}.png" if s.setting else "frontier.png"
                    written.append(frontier_plot(s, d / fname,
                                                 title=f"{rep.title} {s.title or ''}".strip()))
            written += _pair(d / "frontiers", "\n".join(md_all), "".join(csv_all), f"{rep.title}: Pareto fronts")
            dom = [(s, dominance_table(s)) for s in by_sel["pareto"]]
            dom = [(s, t) for s, t in dom if t is not None]
            if dom:
                md = "\n".join(f"### {s.title or s.setting or rep.name}\n\n{t[0]}" for s, t in dom)
                csv = "".join(t[1] if i == 0 else t[1].split("\n", 1)[1] for i, (_, t) in enumerate(dom))
                written += _pair(d / "dominance", md, csv, f"{rep.title}: is each baseline's front dominated by "
                                 "MinNorm-OG's? (seed means; weak dominance: at least as good in every metric)")
        md, csv = hyperparameter_table(rep.settings)
        written += _pair(d / "hyperparameters", md, csv, f"{rep.title}: selected hyperparameters")
        md, csv = runtime_table(rep.settings)
        written += _pair(d / "runtime", md, csv, f"{rep.title}: runtime of the selected settings")
        section_notes: list[str] = []
        for section in sections:
            res = section(rep, contents, d)
            written += res.files
            section_notes += res.notes
            section_failures += res.failures
        for p in written:
            if p.parent == d:
                rel = p.relative_to(out)
                line = f"- [{rel}]({rel})"
                if line not in index:
                    index.append(line)
        notes = list(rep.notes) + [f"[{s.setting}] {n}" if s.setting else n for s in rep.settings for n in s.notes]
        notes += section_notes
        if notes:
            index += ["", "Notes:", *[f"- {n}" for n in notes]]
        index.append("")
    written.append(atomic_write_text(out / "index.md", "\n".join(index) + "\n"))
    if section_failures:
        raise ReportSectionError(section_failures, written)
    return written


def _pair(stem: Path, md: str, csv: str, title: str) -> list[Path]:
    return [atomic_write_text(stem.with_suffix(".md"), f"# {title}\n\n{md}"),
            atomic_write_text(stem.with_suffix(".csv"), csv)]
