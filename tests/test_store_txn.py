"""Transactions on the real etcd: compare-and-swap and fencing on a key's create revision."""

from __future__ import annotations

from common.store import Compare, EtcdStore


async def test_a_put_only_if_absent_happens_once(writer: EtcdStore, prefix: str) -> None:
    key = f"{prefix}/leader"
    first = await writer.txn([Compare.created(key, 0)], puts=[(key, b"a")])
    second = await writer.txn([Compare.created(key, 0)], puts=[(key, b"b")])
    assert first.succeeded and not second.succeeded
    assert await writer.get(key) == b"a"
    item = await writer.get_item(key)
    assert item is not None and item.create_revision == first.revision


async def test_a_fenced_write_fails_once_the_key_was_created_again(
        writer: EtcdStore, prefix: str) -> None:
    key, target = f"{prefix}/leader", f"{prefix}/assignments/n1/a-0"
    token = (await writer.txn([Compare.created(key, 0)], puts=[(key, b"old")])).revision
    assert (await writer.txn([Compare.created(key, token)], puts=[(target, b"1")])).succeeded
    # The old holder's lease expired and another took the key: same value, newer creation.
    await writer.delete(key)
    await writer.txn([Compare.created(key, 0)], puts=[(key, b"old")])
    late = await writer.txn([Compare.created(key, token)], puts=[(target, b"2")],
                            deletes=[f"{prefix}/other"])
    assert not late.succeeded
    assert await writer.get(target) == b"1"


async def test_compare_and_swap_on_the_mod_revision(writer: EtcdStore, prefix: str) -> None:
    key = f"{prefix}/deployments/d"
    await writer.put(key, b"v1")
    item = await writer.get_item(key)
    assert item is not None
    await writer.put(key, b"v2")  # a concurrent change
    lost = await writer.txn([Compare.modified(key, item.mod_revision)], puts=[(key, b"v3")])
    assert not lost.succeeded and await writer.get(key) == b"v2"
    fresh = await writer.get_item(key)
    assert fresh is not None
    won = await writer.txn([Compare.modified(key, fresh.mod_revision)], puts=[(key, b"v3")],
                           deletes=[key + "-gone"])
    assert won.succeeded and await writer.get(key) == b"v3"
