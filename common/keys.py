"""The etcd key layout (docs/contracts.md: etcd keys and records), in one place."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote


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
        return _split_two(key, self.backends)

    # -- deployments (docs/deployments.md) ---------------------------------------------------

    @property
    def deployments(self) -> str:
        """Prefix of every deployment (desired state, written by operators)."""
        return f"{self.prefix}/deployments/"

    def deployment(self, name: str) -> str:
        return f"{self.prefix}/deployments/{name}"

    @property
    def assignments(self) -> str:
        """Prefix of every assignment (written by the elected placer only)."""
        return f"{self.prefix}/assignments/"

    def node_assignments(self, node: str) -> str:
        """Prefix of one node's assignments: the only part of the tree its agent watches."""
        return f"{self.prefix}/assignments/{node}/"

    def assignment(self, node: str, name: str) -> str:
        return f"{self.prefix}/assignments/{node}/{name}"

    def split_assignment(self, key: str) -> tuple[str, str] | None:
        """``(node, backend name)`` of an assignment key, or None for a key that is not one."""
        return _split_two(key, self.assignments)

    @property
    def placements(self) -> str:
        """Prefix of the placer's per-deployment status (placed, pending and why)."""
        return f"{self.prefix}/placement/"

    def placement(self, deployment: str) -> str:
        return f"{self.prefix}/placement/{deployment}"

    @property
    def loads(self) -> str:
        """Prefix of the scheduler replicas' load records (docs/autoscaling.md)."""
        return f"{self.prefix}/load/"

    def load(self, replica: str) -> str:
        return f"{self.prefix}/load/{replica}"

    @property
    def placer_leader(self) -> str:
        """The election key: present, under its holder's lease, while a placer leads."""
        return f"{self.prefix}/placer/leader"

    # -- models (docs/models.md) -------------------------------------------------------------

    @property
    def models(self) -> str:
        """Prefix of the nodes' models records (what each models_dir holds, leased)."""
        return f"{self.prefix}/models/"

    def models_of(self, node: str) -> str:
        return f"{self.prefix}/models/{node}"

    def model_lock(self, storage: str, model: str) -> str:
        """The download lock of ``model`` on one models_dir (shared ones: one per cluster)."""
        return f"{self.prefix}/model-locks/{storage}/{escape_model(model)}"

    @property
    def model_removals(self) -> str:
        return f"{self.prefix}/model-rm/"

    def node_model_removals(self, node: str) -> str:
        return f"{self.prefix}/model-rm/{node}/"

    def model_removal(self, node: str, model: str) -> str:
        return f"{self.prefix}/model-rm/{node}/{escape_model(model)}"

    # -- routes (docs/routes.md) ------------------------------------------------------------

    @property
    def routes(self) -> str:
        """Prefix of every route (written by operators; guards append trips)."""
        return f"{self.prefix}/routes/"

    def route(self, name: str) -> str:
        return f"{self.prefix}/routes/{name}"

    @property
    def route_stats(self) -> str:
        """Prefix of the schedulers' per-replica route and backend figures (leased)."""
        return f"{self.prefix}/route-stats/"

    def route_stats_of(self, replica: str) -> str:
        return f"{self.prefix}/route-stats/{replica}"

    # -- API keys (docs/keys.md) ---------------------------------------------------------------

    @property
    def api_keys(self) -> str:
        """Prefix of every client API key record (written by aivmmctl keys)."""
        return f"{self.prefix}/keys/"

    def api_key(self, name: str) -> str:
        return f"{self.prefix}/keys/{name}"

    @property
    def schedulers(self) -> str:
        """Prefix of the live scheduler replicas' presence records (leased)."""
        return f"{self.prefix}/schedulers/"

    def scheduler(self, replica: str) -> str:
        return f"{self.prefix}/schedulers/{replica}"

    @property
    def key_usage(self) -> str:
        """Prefix of the per-key usage records, ``{bucket:010d}/{replica}``."""
        return f"{self.prefix}/key-usage/"

    def key_usage_bucket(self, bucket: int) -> str:
        return f"{self.prefix}/key-usage/{bucket:010d}/"

    def key_usage_of(self, bucket: int, replica: str) -> str:
        return f"{self.prefix}/key-usage/{bucket:010d}/{replica}"

    # -- audit trail (docs/operations.md: Audit trail) -----------------------------------------

    @property
    def audit(self) -> str:
        """Prefix of every audit entry; the keys sort by time."""
        return f"{self.prefix}/audit/"

    def audit_entry(self, time_ns: int, suffix: str) -> str:
        """An audit entry's key: its time in nanoseconds (19 digits), then a random suffix."""
        return f"{self.prefix}/audit/{time_ns:019d}-{suffix}"

    def audit_time_ns(self, key: str) -> int | None:
        """The time in an audit entry's key, or None for a key that is not one."""
        stamp, sep, suffix = key.removeprefix(self.audit).partition("-")
        if not key.startswith(self.audit) or not sep or not suffix or len(stamp) != 19 \
                or not stamp.isdigit():
            return None
        return int(stamp)


def escape_model(model: str) -> str:
    """A model id as one key part: ``org/name`` is ``org%2Fname``."""
    return quote(model, safe="")


def unescape_model(part: str) -> str:
    return unquote(part)


def _split_two(key: str, prefix: str) -> tuple[str, str] | None:
    rest = key.removeprefix(prefix)
    if rest == key:
        return None
    first, sep, second = rest.partition("/")
    if not sep or not first or not second or "/" in second:
        return None
    return first, second
