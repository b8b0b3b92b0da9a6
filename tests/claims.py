"""The reliability claims the README makes, each with the figure a test asserts.

One registry: every figure below is a constant that the named test imports and asserts, and
the README's "Reliability" table is rendered from :data:`CLAIMS` (``python
tools/readme_tables.py`` writes it, ``--check`` fails when the committed table is stale).
So the README can only state what a test asserts; changing a figure here changes both.

Allowances are for this project's CI machine (2 shared vCPUs, loopback servers). A figure a
shared machine cannot hold reliably does not belong here: it moves to ``tools/`` benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

# Plain data, no imports of propstore: tools/readme_tables.py renders the table with the
# standard library only. The tests check their topology uses these settings.
#: ``routing.replica_deadline`` the figures are stated at (the default), seconds.
REPLICA_DEADLINE = 0.05
#: ``routing.write_retry_time`` the figures are stated at (the default), seconds.
WRITE_RETRY_TIME = 3.0

#: Budgets every workload (``tests/_workload.py``) reads with, in seconds.
WORKLOAD_BUDGETS = (0.1, 0.5, 1.0, 5.0)

#: Seconds a read that meets a frozen (SIGSTOP) replica may take beyond the replica deadline
#: plus the slowest raw primary read of the same run (the fallback it then makes): timer
#: wake-up and the pool's checkout. Time the process was given no CPU meanwhile (a loaded
#: machine: the timer fires that late) is measured and excused (``tests/test_store.py``,
#: ``SchedulingLag``). The tight figure (client and servers on separate CPUs) is the
#: ``frozen-replica`` benchmark in ``tools/``.
FROZEN_READ_ALLOWANCE = 0.010
#: Reads in a row the sequential frozen-replica tests make.
FROZEN_READS = 300

#: How far the growth rate of a cut replica's staleness bound may be from the clock's own
#: (1 s per s): the bound is ``now - t_sent`` of a sample that no longer advances.
CUT_RECEIVER_RATE_TOLERANCE = 0.05
#: Seconds over which the cut receiver's bound is watched.
CUT_RECEIVER_WATCH = 1.2

#: Seconds beyond ``routing.write_retry_time`` a write to a dead primary may take to fail:
#: the attempt in flight at the limit (refused at once by a killed server) plus scheduling.
WRITE_FAILURE_ALLOWANCE = 0.25

#: Acknowledged writes before the primary is killed in the crash test.
CRASH_WRITES = 200

#: Reads made while a replica refuses connections, and the share of them that must finish
#: within the replica deadline: the refusing node is skipped, not waited for, so a read
#: that tried it would take the deadline; the rest allows for a scheduling stall or two.
REFUSING_READS = 250
REFUSING_FAST_SHARE = 0.99

#: Client RSS growth allowed over the load test (seconds from ``PROPSTORE_LOAD_SECONDS``).
LOAD_SECONDS = 60.0
LOAD_RSS_GROWTH = 0.05

#: Random schedules the bounded-staleness property test runs (fresh users each).
HYPOTHESIS_SCHEDULES = 25

#: Calls of the public-API fuzz test.
FUZZ_CALLS = 300

#: Rows the backfill test updates, its ``max_lag`` (seconds), and what a replica's measured
#: staleness may exceed ``max_lag`` plus the longest batch by: the guard's check round trips
#: and the observer's 20 ms sampling.
BACKFILL_ROWS = 200_000
BACKFILL_MAX_LAG = 0.5
BACKFILL_ALLOWANCE = 0.15

#: Reads, and bytes of growth of propstore's own traced memory allowed over them (pools
#: replacing connections abandoned at a deadline make a few kB of churn on a busy machine).
MEMORY_READS = 100_000
MEMORY_GROWTH_BYTES = 16 * 1024

#: Worker processes on one topology in the shared-monitoring test, and the most monitoring
#: transactions per second any server may count from all of them, as a multiple of one
#: monitor's (1 / ``monitor.interval``): the issue's bar is 2x the one-process figure.
SHARE_PROCESSES = 4
FLEET_QUERY_RATIO = 2.0
#: Worker processes of the chaos run in every ``pytest`` (paused replay, an apply delay, a
#: stuck and then a killed agent); ``PROPSTORE_CHAOS_PROCESSES=32`` runs the issue's size.
CHAOS_PROCESSES = 8
#: Worker processes whose agent is killed (or stopped, and then ended by its stores) in the
#: herd test, and the most own-monitor (``propstore-monitor``) connections any server may
#: count meanwhile: the store that starts the replacement polls for itself, the rest wait
#: for it (up to 10 s while it starts it).
HERD_PROCESSES = 8
HERD_OWN_MONITORS = 1


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _s(seconds: float) -> str:
    return f"{seconds:g} s"


def _budgets() -> str:
    return ", ".join(_s(b) for b in WORKLOAD_BUDGETS)


@dataclass(frozen=True)
class Claim:
    """One row of the README's reliability table."""

    situation: str
    asserted: str
    tests: tuple[str, ...]


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "replica killed (`-m immediate`) and restarted, under 6 threads of load",
        f"0 failed reads, 0 budget violations (budgets {_budgets()} and token reads, each "
        "checked against every write acknowledged before its cut-off); replicas served "
        "reads; routing resumed after catch-up",
        ("test_faults.py::test_replica_killed_and_restarted_fails_no_read",),
    ),
    Claim(
        "replica frozen (SIGSTOP of every process) then thawed",
        f"of {FROZEN_READS} reads in a row, those that meet the frozen replica wait out the "
        f"deadline ({_ms(REPLICA_DEADLINE)}) and end within it + the run's slowest raw "
        f"primary read + {_ms(FROZEN_READ_ALLOWANCE)}, sync and async (tight figure: "
        "benchmarks below); under load 0 errors, 0 violations; connections bounded after",
        ("test_store.py::test_frozen_replica_costs_a_read_at_most_the_deadline_plus_a_"
         "primary_read", "test_async_store.py::test_async_frozen_replica_costs_at_most_the_"
         "deadline", "test_faults.py::test_replica_frozen_then_thawed_blocks_no_read_and_"
         "leaks_no_connection"),
    ),
    Claim(
        "replica's WAL receiver cut",
        "state `receiver disconnected`; its bound never 0 and grows at the clock's rate "
        f"(1 s per s ± {CUT_RECEIVER_RATE_TOLERANCE:.0%}, watched {_s(CUT_RECEIVER_WATCH)}); "
        "dropped out of `workflow`",
        ("test_faults.py::test_cut_wal_receiver_is_never_zero_lag_and_drops_out_of_"
         "eligibility",),
    ),
    Claim(
        "primary killed",
        "writes fail with `ShardUnavailableError` naming the shard after `write_retry_time` "
        f"({_s(WRITE_RETRY_TIME)}) + at most {_ms(WRITE_FAILURE_ALLOWANCE)}; "
        "budgeted reads served by replicas with a growing bound; writes resume after restart",
        ("test_faults.py::test_primary_killed_writes_fail_fast_reads_continue_and_writes_"
         "resume",),
    ),
    Claim(
        "primary restarted in place (`pg_ctl stop -m fast`, then start), under 6 threads of "
        "load",
        f"0 failed reads or writes, 0 budget violations (budgets {_budgets()} and token "
        "reads), sync and async: reads the restart met were retried within "
        "`primary_deadline` and served by a replica that came to prove them or the primary",
        ("test_faults.py::test_primary_restarted_in_place_fails_no_read_and_keeps_every_"
         "budget",),
    ),
    Claim(
        "primary crash right after acknowledged writes",
        f"{CRASH_WRITES} acknowledged, 0 lost; every token ≤ recovered LSN",
        ("test_faults.py::test_primary_crash_after_acknowledged_writes_loses_none",),
    ),
    Claim(
        "failover (promote, stop old primary, repoint other replica) under load",
        "every acknowledged write on the new primary, 0 budget violations",
        ("test_faults.py::test_failover_is_followed_and_no_acknowledged_write_is_lost",),
    ),
    Claim(
        "a replica refusing connections (max_connections)",
        f"reads fall back at once: ≥ {REFUSING_FAST_SHARE:.0%} of {REFUSING_READS} reads end "
        f"within the replica deadline ({_ms(REPLICA_DEADLINE)}), none served by that replica; "
        "`node_state_changed ... too many clients` logged",
        ("test_faults.py::test_replica_refusing_connections_falls_back_and_logs",),
    ),
    Claim(
        f"8 threads mixed load for {_s(LOAD_SECONDS)}, a replica paused half the time",
        f"0 errors, 0 violations, every budget checked, replicas served reads, client RSS "
        f"growth < {LOAD_RSS_GROWTH:.0%}",
        ("test_load.py::test_mixed_load_with_a_replica_paused_half_the_time_holds",),
    ),
    Claim(
        "hypothesis: random pauses, apply delays, writes, budgets",
        f"{HYPOTHESIS_SCHEDULES} schedules on fresh users; no read older than its budget, "
        "every token read sees its write; replicas served some",
        ("test_bounded_staleness.py::test_no_read_is_older_than_its_budget_under_random_lag",),
    ),
    Claim(
        "fuzz over the public API and the bad inputs listed above",
        f"{FUZZ_CALLS} calls: each succeeds or raises a `PropStoreError`; the stored document "
        "never changes on failure",
        ("test_fuzz.py", "test_store.py::test_bad_input_raises_and_leaves_the_document_"
         "unchanged"),
    ),
    Claim(
        f"backfill of {BACKFILL_ROWS // 1000}k rows, a replica's apply delay raised mid-way",
        f"it pauses and shrinks batches; the replica's staleness, sampled every 20 ms, stays "
        f"within `max_lag` ({_s(BACKFILL_MAX_LAG)}) + the longest batch + "
        f"{_ms(BACKFILL_ALLOWANCE)}, never unproven",
        ("test_backfill.py::test_backfill_of_200k_rows_pauses_for_a_delayed_replica_and_keeps_"
         "it_within_budget",),
    ),
    Claim(
        f"{MEMORY_READS // 1000}k reads",
        f"propstore's own traced memory grew by < {MEMORY_GROWTH_BYTES / 1024:g} KiB (a "
        "byte per read would be 98 KiB); a replica served them",
        ("test_store.py::test_monitor_and_store_memory_stay_flat_across_100k_reads",),
    ),
    Claim(
        f"{SHARE_PROCESSES} processes on one host and topology (`sharing = \"host\"`, the "
        "default)",
        "one `propstore-agent` connection per server and no other monitoring connection; "
        f"monitoring transactions per server ≤ {FLEET_QUERY_RATIO:g}x one monitor's (both "
        "counted on the servers); `sharing = \"off\"`: one `propstore-monitor` connection "
        "per process",
        ("test_agent.py::test_processes_on_one_topology_share_one_monitor_on_every_server",
         "test_agent.py::test_sharing_off_gives_every_process_its_own_monitor"),
    ),
    Claim(
        "the host's lag agent SIGKILLed under load, a replica paused",
        "every process stops following it, then follows a new agent; 0 errors, "
        "0 budget violations; one agent connection per server after",
        ("test_agent.py::test_killed_agent_readers_fall_back_then_share_again_with_no_read_"
         "outside_budget",),
    ),
    Claim(
        f"{HERD_PROCESSES} processes' agent SIGKILLed, or SIGSTOPped (its stores end it)",
        f"own-monitor connections on any server meanwhile: at most {HERD_OWN_MONITORS} (the "
        "store starting the replacement polls; the rest wait for it, not one connection "
        "per process); 0 errors, 0 budget violations",
        ("test_agent.py::test_a_herd_that_lost_its_agent_waits_for_the_replacement_instead_"
         "of_each_polling_every_server",),
    ),
    Claim(
        f"{CHAOS_PROCESSES} processes: paused replay, an apply delay, the agent stopped "
        "(SIGSTOP: its stores end it), its replacement killed",
        "0 errors, 0 budget violations in every process, every budget checked; all share "
        "one agent again after (32 processes: `PROPSTORE_CHAOS_PROCESSES=32`)",
        ("test_agent.py::test_chaos_of_many_processes_serves_no_read_outside_its_budget",),
    ),
)

def render_reliability_table() -> str:
    """The README's reliability table (Markdown), without the markers."""
    lines = ["| what happened | asserted by every `pytest` run | test |", "|---|---|---|"]
    for claim in CLAIMS:
        tests = "<br>".join(f"`{t.split('::')[0]}`" for t in dict.fromkeys(
            t.split("::")[0] for t in claim.tests))
        lines.append(f"| {claim.situation} | {claim.asserted} | {tests} |")
    return "\n".join(lines) + "\n"

