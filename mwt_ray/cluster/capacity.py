"""How many workers, trials or actors of one size the running Ray cluster can place now.

Every stage checks this before it asks Ray for anything: Ray waits forever for resources that never
come, where a check says in one line what was asked and what the cluster has.

    room = cluster_room(cpus=2, gpus=0)        # Ray must be initialised
    if room.count < wanted:
        raise SetupError(f"... {room.asked} each, but the Ray cluster has {room.have}: room for {room.count}")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Room", "cluster_room"]


@dataclass(frozen=True)
class Room:
    """What fits: ``count`` of one size (each placed whole on one node), and the words for messages."""
    count: int
    asked: str  # one unit's size: "2 CPU" or "1 CPU and 0.5 GPU"
    have: str  # the cluster: "8 CPUs on 2 node(s)", with its GPUs when GPUs were asked for
    largest: str  # the node with the most CPUs: "4 CPUs and 0 GPUs"


def cluster_room(cpus: float, gpus: float = 0.0) -> Room:
    """How many units of ``cpus`` CPUs and ``gpus`` GPUs the alive nodes of the running cluster can
    hold at once (``gpus=0``: GPUs are not counted)."""
    import ray

    need = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    # 1e-9: a division of floats such as 0.3 / 0.1 lands a hair under the whole number
    count = sum(min(math.floor(res.get(key, 0.0) / amount + 1e-9) for key, amount in need.items()) for res in nodes)
    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPUs" + (f" and {total.get('GPU', 0):g} GPUs" if gpus > 0 else "")
    biggest = max(nodes, key=lambda res: res.get("CPU", 0.0), default={})
    return Room(count=count, asked=f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus > 0 else ""),
                have=f"{have} on {len(nodes)} node(s)",
                largest=f"{biggest.get('CPU', 0):g} CPUs and {biggest.get('GPU', 0):g} GPUs")
