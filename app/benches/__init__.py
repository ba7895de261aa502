"""``edgezo bench``: the benchmarks a user runs, each printing a table (or a summary) and writing JSON.

    edgezo bench forward      forward time per quantization type (edge.bench)
    edgezo bench step         one ZO step ÷ two forwards, and peak RSS (edge.bench)
    edgezo bench compression  bytes, error, cosine and speed of every downlink codec
    edgezo bench guide-load   the guide daemon under N simulated clients over TLS
    edgezo bench convert      time and peak RSS of SmolLM2 conversions

The scripts under bench/ for the last three are thin wrappers around these modules. Heavy or optional
imports (psutil, cloud.*, the converters) happen inside the run functions.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its five subcommands to the edgezo CLI."""
    from app.benches import compression, convert, guide_load
    from edge.bench import add_commands

    b = sub.add_parser("bench", help="benchmarks: forward, step, compression, guide-load, convert (tables + JSON)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bs = b.add_subparsers(dest="bench", metavar="BENCH")
    add_commands(bs)
    for name, mod, help_ in (
        ("compression", compression, "bytes vs fp32, error, cosine and MB/s of every downlink codec"),
        ("guide-load", guide_load, "the guide daemon under N simulated clients (uploads/s, ack latency, RSS)"),
        ("convert", convert, "wall time and peak RSS of SmolLM2 conversions (HF -> GGUF types)"),
    ):
        p = bs.add_parser(name, help=help_, description=mod.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(handler=mod.run)
    b.set_defaults(handler=lambda args: (b.print_help(), 2)[1])
