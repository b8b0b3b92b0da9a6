"""Replication lag tracking: node state, sound staleness bounds, the polling monitor."""

from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._state import LagHistory, NodeView, Observation, ShardView

__all__ = ["LagHistory", "LagMonitor", "MonitorState", "NodeView", "Observation", "ShardView"]
