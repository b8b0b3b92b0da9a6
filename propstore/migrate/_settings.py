"""PostgreSQL server settings as ``pg_settings`` describes them, and values checked against
that description before any server is touched. No I/O.

A value is normalised the way the server stores it in ``pg_settings.setting`` (integers and
reals in the setting's own unit, booleans as ``on``/``off``, enums as listed in
``enumvals``), so the same string later verifies that a node really runs with it. This is
hand-written because PostgreSQL offers no SQL function that parses a value for a
``sighup``/``postmaster`` setting without setting it, and no client library carries its GUC
rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from propstore.errors import ConfigError

#: How a setting takes effect: a reload, or a server restart (``context = 'postmaster'``).
Effect = Literal["reload", "restart"]

#: PostgreSQL's hot-standby parameters: a standby's value must be at least its primary's,
#: or (14+) its recovery pauses ("insufficient parameter settings") — or it does not start.
HOT_STANDBY_PARAMETERS: tuple[str, ...] = (
    "max_connections", "max_locks_per_transaction", "max_prepared_transactions",
    "max_wal_senders", "max_worker_processes",
)

#: Values that break what propstore proves or serves, refused whatever the server accepts.
_UNSAFE: Mapping[tuple[str, str], str] = {
    ("synchronous_commit", "off"): "acknowledged writes would no longer be flushed WAL, "
    "which every replica staleness proof relies on",
    ("hot_standby", "off"): "replicas would stop accepting reads",
    ("wal_level", "minimal"): "streaming replication needs wal_level replica or logical",
}

# Memory units are kB-based (PostgreSQL: 1 kB = 1024 B); time units relative to ms.
_MEMORY = {"B": 1 / 1024, "kB": 1.0, "MB": 1024.0, "GB": 1024.0 ** 2, "TB": 1024.0 ** 3}
_TIME = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0,
         "d": 86_400_000.0}
_TRUE = {"on", "true", "yes", "1", "t", "y"}
_FALSE = {"off", "false", "no", "0", "f", "n"}
_NUMBER = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """One row of ``pg_settings`` on one node (the columns validation needs).

    Attributes:
        name: the setting's name.
        setting: its current value, as the server stores it (in :attr:`unit`).
        unit: the unit of integer/real values (``ms``, ``8kB``, ...), or None.
        vartype: ``bool``, ``integer``, ``real``, ``string`` or ``enum``.
        context: ``postmaster``, ``sighup``, ``superuser``, ``user``, ``internal``, ...
        min_val, max_val: the allowed range (numbers, in :attr:`unit`).
        enumvals: the allowed values of an enum.
        pending_restart: a changed value waits for a restart.
        in_auto_conf: the value comes from ``postgresql.auto.conf`` (ALTER SYSTEM).
    """

    name: str
    setting: str
    unit: str | None
    vartype: str
    context: str
    min_val: str | None = None
    max_val: str | None = None
    enumvals: tuple[str, ...] = ()
    pending_restart: bool = False
    in_auto_conf: bool = False

    @property
    def effect(self) -> Effect:
        """``restart`` for a ``postmaster`` setting, else ``reload``."""
        return "restart" if self.context == "postmaster" else "reload"

    def shown(self, value: str | None = None) -> str:
        """A stored value with its unit (``100``, ``16384 (8kB)`` -> ``128MB``-like text)."""
        value = self.setting if value is None else value
        return f"{value}{_unit_suffix(self.unit)}" if self.unit else value


def _unit_suffix(unit: str | None) -> str:
    if unit is None:
        return ""
    return f" x {unit}" if unit[0].isdigit() else unit


class SettingValueError(ConfigError):
    """A setting or value was refused (unknown, wrong type, out of range, not allowed).

    Attributes:
        setting: the setting's name.
        node: the node whose ``pg_settings`` refused it (None: refused everywhere).
    """

    def __init__(self, setting: str, node: str | None, message: str) -> None:
        where = f" on {node}" if node else ""
        super().__init__(f"{setting}{where}: {message}")
        self.setting = setting
        self.node = node


def info_from_row(row: Mapping[str, Any]) -> SettingInfo:
    """A :class:`SettingInfo` from a ``pg_settings`` row (dict of column values)."""
    return SettingInfo(
        name=row["name"], setting=row["setting"], unit=row["unit"], vartype=row["vartype"],
        context=row["context"], min_val=row["min_val"], max_val=row["max_val"],
        enumvals=tuple(row["enumvals"] or ()), pending_restart=bool(row["pending_restart"]),
        in_auto_conf=bool(row.get("in_auto_conf")),
    )


def normalise(info: SettingInfo, value: str, node: str | None = None) -> str:
    """``value`` as ``pg_settings.setting`` will show it once applied, or raise
    :class:`SettingValueError` naming the setting, the node and what is allowed."""
    text = str(value).strip()
    if info.context == "internal":
        raise SettingValueError(info.name, node, "is read-only (context internal): it is "
                                "fixed when the cluster is created or compiled in")
    if info.vartype == "bool":
        lowered = text.lower()
        if lowered in _TRUE:
            result = "on"
        elif lowered in _FALSE:
            result = "off"
        else:
            raise SettingValueError(info.name, node, f"{text!r} is not a boolean "
                                    "(allowed: on, off, true, false, yes, no, 1, 0)")
    elif info.vartype == "enum":
        matches = [v for v in info.enumvals if v.lower() == text.lower()]
        if not matches:
            raise SettingValueError(info.name, node, f"{text!r} is not allowed "
                                    f"(allowed: {', '.join(info.enumvals)})")
        result = matches[0]
    elif info.vartype in ("integer", "real"):
        result = _number(info, text, node)
    else:
        result = text
    reason = _UNSAFE.get((info.name, result))
    if reason:
        raise SettingValueError(info.name, node, f"{result!r} is refused: {reason}")
    return result


def _number(info: SettingInfo, text: str, node: str | None) -> str:
    match = _NUMBER.match(text)
    kind = "an integer" if info.vartype == "integer" else "a number"
    if match is None:
        raise SettingValueError(info.name, node, f"{text!r} is not {kind}"
                                f"{_units_hint(info)}")
    number, unit = float(match.group(1)), match.group(2)
    if unit:
        number = _convert(info, number, unit, node)
    if info.vartype == "integer":
        if not math.isfinite(number):
            raise SettingValueError(info.name, node, f"{text!r} is not an integer")
        # PostgreSQL rounds a converted value to the nearest integer (rint).
        number = float(round(number))
        if not unit and number != float(match.group(1)):
            raise SettingValueError(info.name, node, f"{text!r} is not an integer")
    low = float(info.min_val) if info.min_val is not None else -math.inf
    high = float(info.max_val) if info.max_val is not None else math.inf
    if not low <= number <= high:
        raise SettingValueError(
            info.name, node, f"{text} is out of range (allowed: {info.shown(info.min_val)} "
            f"to {info.shown(info.max_val)})")
    if info.vartype == "integer":
        return str(int(number))
    return format(number, "g")


def _units_hint(info: SettingInfo) -> str:
    if info.unit is None:
        return ""
    base = _base_unit(info.unit)
    family = _MEMORY if base in _MEMORY else _TIME
    return f" (units: {', '.join(family)}; bare numbers are in {info.unit})"


def _base_unit(unit: str) -> str:
    return unit.lstrip("0123456789")


def _convert(info: SettingInfo, number: float, unit: str, node: str | None) -> float:
    if info.unit is None:
        raise SettingValueError(info.name, node, f"takes no unit (got {unit!r})")
    base = _base_unit(info.unit)
    multiple = float(info.unit[: len(info.unit) - len(base)] or 1)
    for family in (_MEMORY, _TIME):
        if base in family:
            if unit not in family:
                raise SettingValueError(info.name, node, f"unit {unit!r} is not valid"
                                        f"{_units_hint(info)}")
            return number * family[unit] / (family[base] * multiple)
    raise SettingValueError(info.name, node, f"unit {unit!r} is not valid here")


def same_value(info: SettingInfo, stored: str, expected: str) -> bool:
    """Whether a ``pg_settings.setting`` equals a normalised value (reals compared as
    numbers: the server prints them its own way)."""
    if info.vartype == "real":
        try:
            return math.isclose(float(stored), float(expected), rel_tol=1e-9)
        except ValueError:
            return False
    return stored == expected


__all__ = [
    "HOT_STANDBY_PARAMETERS",
    "Effect",
    "SettingInfo",
    "SettingValueError",
    "info_from_row",
    "normalise",
    "same_value",
]
