"""Fuzzing the public API: every call succeeds or raises a PropStoreError, and a failed call
leaves the stored document exactly as it was."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propstore import PropertyStore, PropStoreError, Topology
from propstore.sandbox import LocalCluster
from tests import claims

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
clean_scalars = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000),
                          st.floats(allow_nan=False, allow_infinity=False),
                          st.text(alphabet=st.characters(blacklist_characters="\x00"),
                                  max_size=20))
hostile = st.one_of(
    st.binary(max_size=5), st.sets(st.integers(), max_size=2), st.dates(),
    st.just(float("nan")), st.just("\x00"), st.just(object()),
)
values = st.recursive(
    st.one_of(json_scalars, hostile),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=8), st.integers()),
                                            inner, max_size=3)),
    max_leaves=8,
)
documents = st.one_of(
    st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), clean_scalars, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=300), st.integers(), st.none()), values,
                    max_size=4),
    values,
)
valid_ids = st.sampled_from(["fuzz-a", "fuzz-b"])
ids = st.one_of(valid_ids, valid_ids, valid_ids, st.text(max_size=300), st.integers(),
                st.none())
tenants = st.one_of(st.just("acme"), st.just("acme"), st.just("acme"), st.text(max_size=20),
                    st.just("ac me"), st.none())
calls = st.one_of(
    st.tuples(st.just("set"), tenants, ids, documents),
    st.tuples(st.just("replace"), tenants, ids, documents),
    st.tuples(st.just("unset"), tenants, ids, st.one_of(st.lists(st.text(max_size=10)),
                                                        st.text(), st.integers())),
    st.tuples(st.just("delete"), tenants, ids),
    st.tuples(st.just("get"), tenants, ids, st.one_of(
        st.floats(allow_nan=True), st.text(max_size=8), st.integers(-5, 5), st.just("1s"))),
)


@pytest.mark.slow
def test_public_api_either_succeeds_or_raises_propstore_error_and_changes_nothing(
    migrated_cluster: LocalCluster, propstore_clean_state: LocalCluster
) -> None:
    assert propstore_clean_state.config_path is not None
    topology = Topology.load(propstore_clean_state.config_path)
    outcomes = {"ok": 0, "refused": 0}
    with PropertyStore(topology) as store:
        for user in ("fuzz-a", "fuzz-b"):
            store.replace("acme", user, {"seed": user})

        @settings(max_examples=claims.FUZZ_CALLS, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(call=calls)
        def run(call: tuple[Any, ...]) -> None:
            kind, tenant, user, *rest = call
            snapshot = {u: store.read("acme", u, consistency="strong").props
                        for u in ("fuzz-a", "fuzz-b")}
            try:
                if kind == "get":
                    store.get(tenant, user, max_staleness=rest[0])
                else:
                    getattr(store, kind)(tenant, user, *rest)
            except PropStoreError:
                outcomes["refused"] += 1
                after = {u: store.read("acme", u, consistency="strong").props
                         for u in ("fuzz-a", "fuzz-b")}
                assert after == snapshot
            else:
                outcomes["ok"] += 1

        run()
    print(f"fuzz: {outcomes['ok']} calls succeeded, {outcomes['refused']} refused cleanly")
    assert outcomes["refused"] > 0 and outcomes["ok"] > 0
    assert sum(outcomes.values()) >= claims.FUZZ_CALLS
