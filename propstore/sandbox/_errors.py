"""The one exception the sandbox raises on purpose."""

from __future__ import annotations

from propstore.errors import PropStoreError


class SandboxError(PropStoreError):
    """The local cluster could not be set up, driven or torn down.

    The message names the node (``shard0-replica1``), binary or folder at fault and, when a
    server failed, the tail of its log file.
    """
