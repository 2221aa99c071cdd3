"""Reconciliation plans: desired container specs against what Docker shows (pure)."""

from __future__ import annotations

from agent.config import BackendConfig
from agent.docker.observed import ObservedContainer
from agent.docker.spec import ContainerSpec, build_spec
from agent.supervisor import Adopt, Create, Recreate, Remove, Start, plan


def spec(name: str, **kw: object) -> ContainerSpec:
    b = BackendConfig(name=name, model="m", engine="sim", port=9000, **kw)  # type: ignore[arg-type]
    return build_spec("n", b, [], None, models_dir="/m", advertise_host="127.0.0.1")


def seen(backend: str, config_hash: str, cid: str = "c1",
         running: bool = True) -> ObservedContainer:
    return ObservedContainer(id=cid, name=f"aivmm-n-{backend}", node="n", backend=backend,
                             config_hash=config_hash, running=running,
                             status="running" if running else "exited")


def test_a_running_container_with_the_same_hash_is_adopted_not_recreated() -> None:
    s = spec("a")
    c = seen("a", s.config_hash)
    assert plan({"a": s}, [c]) == [Adopt("a", c)]


def test_missing_containers_are_created() -> None:
    s = spec("a")
    assert plan({"a": s}, []) == [Create("a", s)]


def test_a_changed_config_recreates() -> None:
    s = spec("a", args=["--x"])
    c = seen("a", spec("a").config_hash)
    assert plan({"a": s}, [c]) == [Recreate("a", c, s)]


def test_a_stopped_container_with_the_right_hash_is_started_again() -> None:
    s = spec("a")
    c = seen("a", s.config_hash, running=False)
    assert plan({"a": s}, [c]) == [Start("a", c)]


def test_containers_of_deleted_backends_are_removed_first() -> None:
    s = spec("a")
    old = seen("old", "h", cid="c9")
    assert plan({"a": s}, [old]) == [Remove("old", old), Create("a", s)]


def test_of_duplicates_the_running_matching_one_is_kept() -> None:
    s = spec("a")
    stale = seen("a", "other", cid="c0")
    stopped = seen("a", s.config_hash, cid="c1", running=False)
    good = seen("a", s.config_hash, cid="c2")
    actions = plan({"a": s}, [stale, stopped, good])
    assert actions[-1] == Adopt("a", good)
    assert {a.container.id for a in actions if isinstance(a, Remove)} == {"c0", "c1"}
