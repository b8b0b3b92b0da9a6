"""Replication lag tracking: node state, sound staleness bounds, the polling monitor."""

from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._report import LagReport, LagRow, lag_report
from propstore.monitor._state import LagHistory, NodeView, Observation, ShardView

__all__ = [
    "LagHistory", "LagMonitor", "LagReport", "LagRow", "MonitorState", "NodeView",
    "Observation", "ShardView", "lag_report",
]
