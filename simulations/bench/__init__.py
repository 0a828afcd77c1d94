"""`fedface bench ...`: benchmarks that print figures (the last stdout line is one JSON object)."""

from __future__ import annotations

import typer

from fedface.simulations.bench.baseline import baseline
from fedface.simulations.bench.console import console
from fedface.simulations.bench.dp import dp
from fedface.simulations.bench.expression import expression
from fedface.simulations.bench.federated import federated
from fedface.simulations.bench.gallery import gallery
from fedface.simulations.bench.lfw import lfw
from fedface.simulations.bench.policy import policy
from fedface.simulations.bench.privacy import privacy
from fedface.simulations.bench.secagg import secagg

bench_app = typer.Typer(
    help="Benchmarks: each prints its figures, the last line of stdout one JSON object.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
bench_app.command()(baseline)
bench_app.command()(console)
bench_app.command()(dp)
bench_app.command()(expression)
bench_app.command()(federated)
bench_app.command()(gallery)
bench_app.command()(lfw)
bench_app.command()(policy)
bench_app.command()(privacy)
bench_app.command()(secagg)

__all__ = ["bench_app"]
