"""``aivmm-agent``: run this machine's backends and publish them in etcd."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from agent.app import build_app
from agent.config import AgentConfig
from agent.docker.client import DockerAdapter, DockerFailed, DockerUnavailable
from common import logs
from common.cli import daemon_parser, load_config, load_or_exit
from common.daemon import run_main, serve
from common.keys import Keys
from common.store import EtcdStore, StoreError

log = logging.getLogger("agent")


async def drain(config: AgentConfig) -> int:
    """Stop and remove this node's containers and delete its records; 0 when done."""
    docker = DockerAdapter(config.docker_host)
    try:
        found = await docker.list_managed(config.node_name)
        for c in found:
            log.info("draining", extra={"backend": c.backend, "container": c.id[:12]})
            await docker.remove(c.id, stop_timeout=30)
    except (DockerUnavailable, DockerFailed) as err:
        print(f"aivmm-agent: drain failed: {err}", file=sys.stderr)
        return 1
    finally:
        await docker.close()
    keys = Keys(config.etcd_prefix)
    try:
        async with EtcdStore(config.etcd, security=config.etcd_security()) as store:
            await store.delete_prefix(keys.node_backends(config.node_name))
            await store.delete(keys.models_of(config.node_name))
            await store.delete(keys.node(config.node_name))
    except StoreError as err:
        # The containers are gone, which is what drain is for; records expire with the lease.
        log.warning("could not delete this node's records: %s", err)
    log.info("drained", extra={"containers": len(found)})
    return 0


async def run(config: AgentConfig, reload: Callable[[], AgentConfig] | None = None) -> int:
    """Serve the agent until SIGTERM (0) or a failure (1: also when ``listen`` is taken)."""
    return await serve(build_app(config, reload=reload), config.listen)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``aivmm-agent`` console script."""
    parser = daemon_parser("aivmm-agent", "/etc/aivmm/agent.toml",
                           "Run this machine's inference backends and publish them in etcd.")
    parser.add_argument("--drain", action="store_true",
                        help="stop and remove this node's backend containers, then exit")
    args = parser.parse_args(argv)
    config = load_or_exit(AgentConfig, args, prog="aivmm-agent")
    logs.setup(config.log_level, config.log_format)

    def reload() -> AgentConfig:
        # The same file, environment and flags as at start; raises ConfigError, no exit.
        return load_config(AgentConfig, args)

    code = run_main(drain(config) if args.drain else run(config, reload))
    raise SystemExit(code)


if __name__ == "__main__":
    main()
