"""Build ``aivmm-agent:local``, ``aivmm-scheduler:local`` and the sim image with no registry.

Each is assembled FROM scratch by :mod:`devtools.image` out of this machine's interpreter, the
installed runtime distributions and this source tree; ``docker/agent/Dockerfile`` and
``docker/scheduler/Dockerfile`` are the same images on an upstream Python base, for hosts
that can pull one.

    python -m devtools.images [--docker-host URL] [agent] [scheduler] [sim]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys

import docker.errors

from devtools.image import SIM, ImageSpec, build_spec


def _healthz(default_listen: str) -> tuple[str, ...]:
    # The images have no shell and no curl: the interpreter checks /healthz itself, on the
    # port AIVMM_LISTEN names (a wildcard address is asked on loopback).
    code = ("import os, urllib.request as u; "
            f"h = os.environ.get('AIVMM_LISTEN', '{default_listen}').rpartition(':'); "
            "a = h[0].strip('[]'); "
            "a = '127.0.0.1' if a in ('', '0.0.0.0', '::') else a; "
            "u.urlopen(f'http://{a}:{h[2]}/healthz', timeout=4)")
    return ("-c", code)


def runtime_requirements(dist: str = "aivmm") -> tuple[str, ...]:
    """The distributions ``dist`` requires at run time (not its extras).

    Not ``aivmm`` itself: installed editable, its files are an import hook that points at
    this checkout; the image gets the packages from the tree instead.
    """
    names = []
    for req in importlib.metadata.requires(dist) or []:
        if "extra" not in req.partition(";")[2]:
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            if match:
                names.append(match.group(1))
    return tuple(names)


# Root: it talks to the Docker socket (root-equivalent anyway) and reads the engines' fdinfo.
AGENT = ImageSpec(
    name="aivmm-agent", distributions=runtime_requirements(), packages=("agent", "common"),
    entrypoint=("-m", "agent.main"), healthcheck=_healthz("127.0.0.1:9410"))

SCHEDULER = ImageSpec(
    name="aivmm-scheduler",
    distributions=("aiohttp", "aetcd", "orjson", "prometheus-client"),
    packages=("scheduler", "common"), entrypoint=("-m", "scheduler.main"),
    user=("aivmm", 65532), healthcheck=_healthz("0.0.0.0:8080"))

SPECS = {"agent": AGENT, "scheduler": SCHEDULER, "sim": SIM}
# The sim keeps `latest`, which the agent's sim engine profile runs.
EXTRA_TAGS = {"agent": ("local",), "scheduler": ("local",), "sim": ("latest",)}


def build(docker_host: str | None, name: str, *, quiet: bool = False) -> str:
    """Build (or reuse) one image; returns its content-addressed reference."""
    return build_spec(docker_host, SPECS[name], quiet=quiet, extra_tags=EXTRA_TAGS[name])


def main(argv: list[str] | None = None) -> None:
    """``python -m devtools.images``: build the named images (default: all three)."""
    parser = argparse.ArgumentParser(prog="python -m devtools.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="agent, scheduler, sim (default: all)")
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST"),
                        help="engine URL, e.g. unix:///run/docker.sock (default DOCKER_HOST)")
    parser.add_argument("--quiet", action="store_true", help="print only the references")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.images) - set(SPECS))
    if unknown:
        parser.error(f"unknown image {', '.join(unknown)}: choose from {', '.join(SPECS)}")
    for name in args.images or list(SPECS):
        try:
            print(build(args.docker_host, name, quiet=args.quiet))
        except (docker.errors.DockerException, RuntimeError) as err:
            print(f"images: {name}: {err}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
