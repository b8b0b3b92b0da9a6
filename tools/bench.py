"""Benchmarks: propstore against raw psycopg, Pgpool-II and a waiting reader, side by side.

    python tools/bench.py [--scenario NAME ...] [--duration S] [--out RESULTS.json]
                          [--plot out.png] [--soak] [--config propstore.toml]

Starts a local cluster (or reuses one with ``--config``), migrates and loads it, runs each
scenario with its contenders interleaved, prints a table, merges the results into
``tools/RESULTS.json`` (each scenario's entry replaced, the others kept, every entry naming
its run: date, command, commit) and renders ``tools/RESULTS.md`` from it. The README's table
is rendered from the same file by ``python tools/readme_tables.py``.
This file only parses arguments, calls ``_bench.runner`` and writes what it returns.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import structlog

from _bench import document, render, report, runner
from _bench.options import Options
from _bench.scenarios import SCENARIOS

HERE = Path(__file__).resolve().parent


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                        help="scenario to run (repeatable; default: all but soak)")
    parser.add_argument("--soak", action="store_true",
                        help="also run the 10-minute soak (its length follows --duration)")
    parser.add_argument("--duration", type=float,
                        help="seconds per scenario (default: each scenario's own, 10-20 s)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of discarded warm-up per scenario (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.json",
                        help="results file to merge into (default tools/RESULTS.json, "
                        "committed; the README's table is rendered from it)")
    parser.add_argument("--fresh", action="store_true",
                        help="replace the results file instead of merging into it")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md",
                        help="results page rendered from --out (default tools/RESULTS.md)")
    parser.add_argument("--conditions", default="",
                        help="free text recorded with the run (e.g. 'shared with 6 test "
                        "runs')")
    parser.add_argument("--plot", type=Path, help="write a PNG of latency distributions")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write pyinstrument profiles of propstore's operations to DIR")
    parser.add_argument("--config", type=Path,
                        help="reuse the cluster of this topology file instead of starting one")
    parser.add_argument("--shards", type=int, default=2, help="shards of a new cluster")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas per shard of a new cluster (default 1: the raw, "
                        "propstore and Pgpool reads then hit the same server)")
    parser.add_argument("--users", type=int, default=20_000, help="users to load")
    parser.add_argument("--no-pgpool", action="store_true", help="leave Pgpool-II out")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin this process to CPU 0 and the servers it starts to "
                        "the other CPUs (pinning removes a placement bias; see "
                        "_bench/affinity.py)")
    parser.add_argument("--pgpool-cpu", choices=("own", "servers", "client"), default="own",
                        help="where pinned Pgpool runs: a CPU of its own when there are 3+ "
                        "(else the servers'), the servers' CPUs, or the client's CPU")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at info level")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every measured bar is met, 1 otherwise."""
    args = parse(sys.argv[1:] if argv is None else argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(
        logging.INFO if args.verbose else logging.WARNING))
    if not args.verbose:
        # psycopg-pool warns on every failed reconnection to a frozen server; the scenario
        # reports what matters.
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    names = args.scenario or runner.default_scenarios(args.soak)
    if args.soak and "soak" not in names:
        names.append("soak")
    options = Options(duration=args.duration, warmup=args.warmup, pgpool=not args.no_pgpool,
                      profile_dir=args.profile, pin=not args.no_pin,
                      pgpool_cpu=args.pgpool_cpu)
    shape = runner.ClusterShape(args.config, args.shards, args.replicas, args.users)
    # Read the file to merge into first: a broken one fails before minutes of measuring.
    base = document.empty() if args.fresh else document.load(args.out)
    results, machine = runner.run(names, options, shape)
    command = shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None
                                                          else argv)])
    report.print_report(results)
    if args.conditions:
        machine["conditions"] = args.conditions
    run_id, run = report.run_info(command, machine)
    merged = document.merge(base, run_id, run, [r.as_dict() for r in results],
                            order=list(SCENARIOS), note=report.RATIO_NOTE)
    document.save(args.out, merged)
    args.markdown.write_text(render.results_markdown(merged))
    print(f"wrote {args.out} and {args.markdown}; "
          "run `python tools/readme_tables.py` to update the README's table")
    if args.plot is not None:
        report.plot(args.plot, results)
    missed = [bar for result in results for bar in result.bars if bar.met is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
