"""Restarting a server, which SQL cannot do: a small pluggable protocol.

A ``postmaster``-context setting (``max_connections``, ``shared_buffers``) takes effect only
after the server restarts, and PostgreSQL has no SQL command for that. A rollout is given a
:class:`NodeController`: the sandbox's :class:`~propstore.sandbox.LocalNodeController`, a
:class:`CommandController` that runs a command template (``ssh {host} sudo systemctl restart
postgresql@15-main``), or anything with a ``restart(node, timeout)`` method (an operator, a
Patroni REST call, Kubernetes).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import psycopg

from propstore.config import NodeConfig
from propstore.errors import ConfigError, MigrationError

_FIELDS = ("node", "host", "port", "address")


@runtime_checkable
class NodeController(Protocol):
    """Restarts one server; returns once it was asked to stop and start again (the rollout
    itself waits until the node answers and has caught up)."""

    def restart(self, node: NodeConfig, timeout: float) -> None:
        """Restart ``node``'s server within ``timeout`` seconds, or raise."""


@dataclass(frozen=True, slots=True)
class CommandController:
    """Runs a command per restart, e.g. ``ssh {host} sudo systemctl restart pg@15-main``.

    The template is split like a shell would (``shlex``) and then each word's ``{node}``,
    ``{host}``, ``{port}`` and ``{address}`` are filled in, so a node's name is never
    interpreted by a shell. A non-zero exit or a timeout fails the step.
    """

    template: str

    def __post_init__(self) -> None:
        try:
            words = shlex.split(self.template)
        except ValueError as exc:
            raise ConfigError(f"restart command {self.template!r}: {exc}") from exc
        if not words:
            raise ConfigError("the restart command is empty")
        try:
            for word in words:
                word.format(**dict.fromkeys(_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"restart command {self.template!r}: unknown placeholder "
                              f"{exc} (use {', '.join('{' + f + '}' for f in _FIELDS)})"
                              ) from exc

    def command(self, node: NodeConfig) -> list[str]:
        """The argument vector for ``node``."""
        params = psycopg.conninfo.conninfo_to_dict(node.dsn)
        values = {"node": node.name, "host": str(params.get("host") or "localhost"),
                  "port": str(params.get("port") or 5432), "address": node.address}
        return [word.format(**values) for word in shlex.split(self.template)]

    def restart(self, node: NodeConfig, timeout: float) -> None:
        """Run the command; raise :class:`MigrationError` with its output when it fails."""
        argv = self.command(node)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise MigrationError(f"restart of {node.name} ({shlex.join(argv)}): {exc}") from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()[-500:]
            raise MigrationError(f"restart of {node.name} ({shlex.join(argv)}) exited "
                                 f"{done.returncode}: {output}")


__all__ = ["CommandController", "NodeController"]
