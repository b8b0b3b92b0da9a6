"""propstore's benchmark suite (run it with ``python tools/bench.py``; see tools/README.md).

Layout: ``env`` (the cluster, migrated and loaded), ``contenders`` (raw psycopg, Pgpool
clients, the waiting reader), ``pgpool`` (the Pgpool-II child process), ``timing``
(interleaved runs), ``workload`` (threads of load and the staleness bookkeeping), ``stats``
(medians, p99, paired ratios), ``scenarios/`` (one module per family), ``report`` (table,
JSON, RESULTS.md, chart), ``runner`` (what the command line calls).
"""
