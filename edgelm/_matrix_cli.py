"""`edgelm matrix`: run a matrix file on Ray with a live table, or re-render a finished run
(--report). The work is edgelm.api.matrix(); this module only renders it."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from edgelm._cli_base import console, err_console, reports_errors
from edgelm.errors import ConfigError


@reports_errors
def matrix(
    matrix_file: Optional[Path] = typer.Argument(None, help="Matrix .yaml (models x profiles x variants); see docs/matrix.md."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for bundles/, matrix.json and pareto.png."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray cluster (host:port; default RAY_ADDRESS, else a local Ray on this machine)."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="At most this many builds at once (default: what Ray fits)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Re-render OUT's table, picks and plot; runs nothing."),
) -> None:
    """Build, evaluate and benchmark a matrix of models x profiles x variants on Ray; pick the best
    bundle per device. Unchanged cells are reused, so rerunning resumes. Exit 1 when a cell failed."""
    from edgelm.matrix.report import load_results

    if report is not None:
        _render(load_results(report), report)
        return
    if matrix_file is None or output is None:
        raise ConfigError("edgelm matrix needs a matrix file and -o OUT (or --report OUT alone)",
                          hint="e.g. edgelm matrix examples/matrix-smoke.yaml -o dist/matrix")
    from rich.live import Live

    from edgelm import api
    from edgelm._render import quiet_libraries
    from edgelm.matrix.report import summary_table

    quiet_libraries()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: tasks cancelled, matrix.json kept
    with Live(console=console, refresh_per_second=2, transient=True) as live:
        results = api.matrix(matrix_file, output, address=address, parallel=parallel,
                             progress=lambda current: live.update(summary_table(current)))
    _render(results, output)
    if results.get("counts", {}).get("failed"):
        raise typer.Exit(1)


def _render(results: dict[str, Any], output: Path) -> None:
    from rich.markup import escape

    from edgelm.matrix.report import PLOT, best_lines, failures, pareto_plot, summary_table

    console.print(summary_table(results))
    for line in failures(results):
        err_console.print(f"[bold red]failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
    for line in best_lines(results):
        console.print(f"best on {escape(line)}", highlight=False, soft_wrap=True)
    plot = pareto_plot(results, Path(output) / PLOT)
    nodes = len((results.get("ray") or {}).get("nodes", []))
    console.print(f"{len(results['cells'])} cells in {results.get('wall_s', 0):.0f} s on {nodes} Ray node(s); "
                  f"results in {Path(output) / 'matrix.json'}" + (f", plot in {plot}" if plot else ""), highlight=False)
