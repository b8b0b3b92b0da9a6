"""Tokens and freshness budgets: pure values."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from propstore import LSN, STRONG, Freshness, InvalidInputError, InvalidTokenError, Token
from propstore.lsn import from_column
from propstore.timeline import WriteMark

shard_names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
lsns = st.integers(min_value=0, max_value=2**64 - 1)


@given(st.dictionaries(shard_names, lsns, max_size=8))
def test_token_string_round_trips(positions: dict[str, int]) -> None:
    token = Token.of(positions)
    text = str(token)
    assert Token.parse(text) == token
    assert all(c.isalnum() or c in "._-" for c in text)  # cookie- and URL-safe


@given(st.dictionaries(shard_names, lsns, max_size=5), st.dictionaries(shard_names, lsns,
                                                                       max_size=5))
def test_merged_token_requires_the_max_per_shard(a: dict[str, int], b: dict[str, int]) -> None:
    merged = Token.of(a) | Token.of(b)
    for shard in set(a) | set(b):
        assert merged.lsn_for(shard) == max(a.get(shard, -1), b.get(shard, -1))


@pytest.mark.parametrize("text", [
    "", "pst1.", "pst2.s0.10", "pst1.s0", "pst1.s0.xyz", "pst1.s0.10.s0.11", "pst1.a b.10",
    "pst1.s0." + "f" * 17, "x" * 9000, "pst2.s0.1-10", "pst2.s0.1-10-20",
    "pst2.s0.1-10-0.s0.1-11-0", "pst2.s0.1-10-0_", "pst2.s0." + "_".join(["1-1-0"] * 9),
])
def test_malformed_token_strings_are_refused(text: str) -> None:
    with pytest.raises(InvalidTokenError):
        Token.parse(text)


def test_token_naming_an_unknown_shard_is_refused() -> None:
    with pytest.raises(InvalidTokenError, match="unknown shard"):
        Token.parse(str(Token.of({"nowhere": 5})), known_shards=["shard0"])


def test_lsn_prints_and_parses_like_postgresql() -> None:
    assert str(LSN.parse("16/B374D848")) == "16/B374D848"
    assert LSN.parse("0/10") - LSN.parse("0/0") == 16


@given(lsns)
def test_a_server_printed_lsn_column_reads_as_lsn_parse_reads_it(position: int) -> None:
    # from_column (a read's and a write's hot path) skips parse's checks: same value, same type.
    printed = str(LSN(position)).encode()
    assert type(from_column(printed)) is LSN
    assert from_column(printed) == LSN.parse(printed) == position


def test_a_write_token_of_one_mark_knows_its_shard_as_a_merged_one_does() -> None:
    mark = WriteMark(3, LSN(200), LSN(150))
    single, merged = Token((("s", mark),)), Token.from_marks([("s", mark), ("s", mark)])
    assert single == merged
    assert single.marks_for("s") == merged.marks_for("s") == (mark,)
    assert single.lsn_for("s") == merged.lsn_for("s") == 200
    assert single.shards == ("s",) and single.lsn_for("t") is None


def test_budget_admits_only_proven_fresh_replicas() -> None:
    budget = Freshness.bounded("500ms") & Freshness.after_token(Token.of({"s": 100}))
    assert budget.admits("s", LSN(100), 0.5)
    assert not budget.admits("s", LSN(99), 0.0)      # token not reached
    assert not budget.admits("s", LSN(200), 0.51)    # bound over budget
    assert not budget.admits("s", None, 0.0)         # nothing proven
    assert not STRONG.admits("s", LSN(10**9), 0.0)   # strong never uses a replica


def test_budget_accepts_seconds_timedelta_and_text() -> None:
    assert Freshness.bounded(0.25) == Freshness.bounded(timedelta(milliseconds=250))
    assert Freshness.bounded("250ms").max_staleness == pytest.approx(0.25)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "soon", True])
def test_negative_or_nonsense_budgets_are_refused(bad: object) -> None:
    with pytest.raises(InvalidInputError):
        Freshness.bounded(bad)  # type: ignore[arg-type]
