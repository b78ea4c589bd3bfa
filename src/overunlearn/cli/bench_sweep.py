"""Running a ``bench`` command as a sweep built in memory.

Every ``overunlearn bench`` command turns its options into a sweep spec (the dict a TOML spec
parses to), runs it through the sweep runner and journal (``<out>/<name>.jsonl``) and reads the
journal back for its table. So a bench run is resumable (run the same command again), its
finished trials are never recomputed, and its numbers are those of ``overunlearn sweep`` on the
same trials.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overunlearn.cli.errors import friendly_errors


@dataclass
class BenchRun:
    """What a bench sweep left: its journal, the runner's counts and the loaded report."""

    journal: Path
    result: Any  # sweep.run.SweepResult
    report: Any  # report.aggregate.SweepReport

    @property
    def settings(self) -> list[Any]:
        return list(self.report.settings)


def sweep_name(base: str, variant: Mapping[str, Any], default: bool) -> str:
    """``base`` for a run with the command's defaults; else ``base_<hash of the variant>``, so a run with
    other options, epochs or hyperparameters gets its own journal and table instead of mixing with it."""
    from overunlearn.storage import stable_hash

    return base if default else f"{base}_{stable_hash(dict(variant), 8)}"


def bench_spec(*, name: str, title: str, benchmark: str, options: Mapping[str, Any], seeds: Sequence[int],
               settings: Sequence[tuple[str, int, Mapping[str, Mapping[str, Any]]]], metrics: Mapping[str, str],
               report_metrics: Sequence[str] | None = None, device: str = "auto", batch: int = 0,
               imports: Sequence[str] = (), statistic: str = "median") -> dict[str, Any]:
    """The sweep spec of one bench run: every method at one hyperparameter point per setting.

    ``settings``: ``(setting name, epochs, {method: {hyperparameter: value}})`` -- one per budget
    (e.g. ``T = 10``, ``100``, ``1000``); the methods of the first setting give the report order.
    ``statistic``: the report's statistic over seeds, ``"median"`` or ``"mean_se"``.
    """
    from overunlearn.engine import resolve_device

    kind = resolve_device(device).type
    if kind != "cpu":  # another device rounds differently: its trials go to a journal of their own
        name = f"{name}_{kind}"
    methods: list[str] = []
    for _, _, points in settings:
        methods += [m for m in points if m not in methods]
    engine: dict[str, Any] = {"device": device}
    if batch:
        engine["batch"] = batch
    report: dict[str, Any] = {"selection": "best_mean", "statistic": statistic}
    if report_metrics:
        report["metrics"] = list(report_metrics)
    benchmark_section: dict[str, Any] = {"name": benchmark, "options": dict(options)}
    if imports:
        benchmark_section["imports"] = list(imports)
    return {
        "name": name, "title": title, "seeds": list(seeds), "methods": methods,
        "benchmark": benchmark_section,
        "budget": {"epochs": settings[0][1]}, "engine": engine, "metrics": dict(metrics),
        "settings": [{"name": s, "budget": {"epochs": T}, "methods": list(points),
                      "grid": {m: {k: [v] for k, v in hp.items()} for m, hp in points.items()}}
                     for s, T, points in settings],
        "report": report,
    }


def run_bench(raw: Mapping[str, Any], out: Path, *, jobs: int = 1, threads: int | None = None,
              device: str = "auto", log: Callable[[str], None] = lambda _m: None,
              on_failure: str = "try --jobs 1 or a smaller preset", executor: str = "local") -> BenchRun:
    """Run the spec ``raw`` (resuming its journal under ``out``; trials that other code journalled -- another
    source fingerprint of the package or of a plugin, another torch -- run again) and load its report."""
    from overunlearn.report.aggregate import load
    from overunlearn.sweep.executors import make_executor
    from overunlearn.sweep.run import run_sweep
    from overunlearn.sweep.spec import parse_spec

    name = str(raw["name"])
    journal = out / f"{name}.jsonl"
    with friendly_errors(f"every finished trial is kept in {journal}; run the same command again to resume",
                         on_failure):
        spec = parse_spec(dict(raw), source=f"bench {raw['benchmark']['name']}", default_name=name)
        out.mkdir(parents=True, exist_ok=True)
        with make_executor(executor, jobs=jobs, threads=threads) as ex:
            # a bench table shows what this code computes: trials journalled by other code are run again
            result = run_sweep(spec, journal, ex, device=device, threads=threads, log=log, rerun_stale=True)
        reports, _ = load(journal, allow_partial=True, sweeps=[name])
    return BenchRun(journal, result, reports[0])


def write_bench_tables(run: BenchRun, out: Path, name: str, metrics: Sequence[str], *, title: str,
                       ref_labels: Mapping[str, str] | None = None, figure_title: str | None = None,
                       echo: Callable[[str], Any] | None = None) -> list[Path]:
    """Print and write the table of every setting of ``run`` (:func:`overunlearn.report.bench_table.method_table`,
    in the setting's statistic): ``<out>/<name>_table.md`` and ``.csv`` and the figure ``<out>/<name>.png``
    (forget against retain: the first two metrics; none with one metric). With several settings (several
    epoch counts) each one's files carry ``_<setting>`` (``T=5`` -> ``_T5``) and its title its name.
    Returns the paths written."""
    import re

    import typer

    from overunlearn.report.bench_table import method_table
    from overunlearn.report.figures import frontier_plot
    from overunlearn.storage import atomic_write_text

    say = echo or typer.echo
    written: list[Path] = []
    settings = run.settings
    for s in settings:
        several = len(settings) > 1
        stem = f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '', s.setting)}" if several else name
        head = f"{title}, {s.setting}" if several else title
        md, csv = method_table(s, list(metrics), s.statistic, ref_labels)
        say("")
        say(head)
        say(md)
        written.append(atomic_write_text(out / f"{stem}_table.md", f"{head}\n\n{md}\n"))
        written.append(atomic_write_text(out / f"{stem}_table.csv", csv))
        if len(s.metrics) >= 2 and any(mr.selected for mr in s.methods):
            fig_title = figure_title or head
            written.append(frontier_plot(s, out / f"{stem}.png", title=f"{fig_title}, {s.setting}" if several
                                         else fig_title))
    return written
