"""Replication lag tracking: node state, sound staleness bounds, the polling monitor, and
the host agent that lets the processes of a host share it."""

from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._report import LagReport, LagRow, lag_report
from propstore.monitor._shared import SharedMonitor, monitor_for
from propstore.monitor._state import LagHistory, NodeView, Observation, ShardView

__all__ = [
    "LagHistory",
    "LagMonitor",
    "LagReport",
    "LagRow",
    "MonitorState",
    "NodeView",
    "Observation",
    "ShardView",
    "SharedMonitor",
    "lag_report",
    "monitor_for",
]
