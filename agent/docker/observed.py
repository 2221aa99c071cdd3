"""What the agent sees of a managed container, read from Docker's inspect data (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.docker.spec import (
    LABEL_BACKEND,
    LABEL_DEPLOYMENT,
    LABEL_HASH,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_PORT,
)


@dataclass(frozen=True, slots=True)
class ObservedContainer:
    """One container carrying the aivmm labels."""

    id: str
    name: str
    node: str
    backend: str
    config_hash: str
    running: bool
    status: str  # Docker's word: created, running, exited, dead, ...
    exit_code: int | None = None
    oom_killed: bool = False
    finished_at: str = ""  # distinguishes one exit of a container from the next
    health: str | None = None  # Docker HEALTHCHECK status, where the image has one
    deployment: str | None = None  # set on a deployment's replica
    port: int | None = None


def observe(attrs: dict[str, Any]) -> ObservedContainer | None:
    """An ObservedContainer from ``docker inspect`` data; None for a container not ours."""
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    if labels.get(LABEL_MANAGED) != "true" or LABEL_BACKEND not in labels:
        return None
    state = attrs.get("State") or {}
    health = state.get("Health") or {}
    return ObservedContainer(
        id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),
        node=labels.get(LABEL_NODE, ""),
        backend=labels[LABEL_BACKEND],
        config_hash=labels.get(LABEL_HASH, ""),
        running=bool(state.get("Running")),
        status=state.get("Status", "unknown"),
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        finished_at=state.get("FinishedAt", ""),
        health=health.get("Status"),
        deployment=labels.get(LABEL_DEPLOYMENT),
        port=int(labels[LABEL_PORT]) if labels.get(LABEL_PORT, "").isdigit() else None,
    )


def exit_reason(c: ObservedContainer) -> str:
    """One line an operator reads in the backend record's ``error``."""
    if c.oom_killed:
        return "container was killed: out of memory"
    return f"container exited with code {c.exit_code}"
