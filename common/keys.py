"""The etcd key layout (DESIGN.md: etcd keys and records), in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Keys under one prefix such as ``/aivmm/v1``."""

    prefix: str = "/aivmm/v1"

    @property
    def nodes(self) -> str:
        """Prefix of every node record (ends with ``/``)."""
        return f"{self.prefix}/nodes/"

    @property
    def backends(self) -> str:
        """Prefix of every backend record (ends with ``/``)."""
        return f"{self.prefix}/backends/"

    @property
    def drains(self) -> str:
        """Prefix of every drain request (ends with ``/``)."""
        return f"{self.prefix}/drain/"

    def drain(self, node: str) -> str:
        """The key whose presence tells ``node``'s agent to stop its backends."""
        return f"{self.prefix}/drain/{node}"

    def node(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def backend(self, node: str, name: str) -> str:
        return f"{self.prefix}/backends/{node}/{name}"

    def node_backends(self, node: str) -> str:
        """Prefix of one node's backend records."""
        return f"{self.prefix}/backends/{node}/"

    def split_backend(self, key: str) -> tuple[str, str] | None:
        """``(node, name)`` of a backend key, or None for a key that is not one."""
        rest = key.removeprefix(self.backends)
        if rest == key:
            return None
        node, sep, name = rest.partition("/")
        if not sep or not node or not name or "/" in name:
            return None
        return node, name
