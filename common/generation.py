"""A deployment's generation: the digest its replicas' containers are built from.

The placer stamps it on each assignment; a changed digest is a new generation, rolled out
replica by replica (docs/deployments.md). The views read it too, to show a rollout.
"""

from __future__ import annotations

import hashlib
import json

from common.records import DeploymentRecord


def generation(d: DeploymentRecord) -> str:
    """A short stable digest of the deployment fields its containers are built from."""
    fields: dict[str, object] = {
        "model": d.model, "engine": d.engine, "gpus": d.gpus, "memory_bytes": d.memory_bytes,
        "image": d.image, "args": d.args, "env": d.env}
    # Added later: in the digest only when set, so existing replicas are not all re-placed.
    if d.cpus is not None:
        fields["cpus"] = d.cpus
    raw = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:12]
