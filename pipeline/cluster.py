"""What the nodes of the Ray cluster can hold.

``ray.available_resources()`` and ``ray.cluster_resources()`` add up every node; a worker runs
on one node, so workers are sized, and requests checked, against single nodes (``ray.nodes()``).
A request no node can hold waits in Ray without end (Ray Train's worker group included), so the
runner checks every step's requests here before it submits the step (`unplaceable`).
"""

from __future__ import annotations

from pathlib import Path

# where `ray up` leaves the cluster config on the head node (its node types: what the autoscaler
# can add)
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def ensure_ray() -> None:
    """Ray for a stage's Ray Data work: the pipeline's instance (stages run in Ray tasks), or,
    when a stage is called directly outside a run, a private local instance (never a cluster
    that happens to run on this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    """Whether one node with resources `node` can hold `bundle` (zero amounts always fit)."""
    return all(amount <= node.get(name, 0) for name, amount in bundle.items() if amount)


def unplaceable(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> dict | None:
    """The first of `bundles` that none of `nodes` can hold, or None when each fits somewhere."""
    for bundle in bundles:
        if not any(fits(bundle, node) for node in nodes):
            return bundle
    return None


def largest_node(resource: str, needs: dict[str, float] | None = None) -> float:
    """The most of `resource` one alive node has, among the nodes that hold `needs`."""
    amounts = [n.get(resource, 0) for n in alive_nodes() if fits(needs or {}, n)]
    return max(amounts, default=0)


def cpus_per_worker(workers: int, needs: dict[str, float] | None = None) -> int:
    """CPU threads each of `workers` workers gets by default: what one node can give (the
    largest node that holds `needs`, e.g. a GPU, less what the calling task holds), capped by
    the CPUs free in the whole cluster now, shared among the workers; at least 1."""
    import ray

    held = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
    one_node = largest_node("CPU", needs) - held
    free = ray.available_resources().get("CPU", 0)
    return max(1, int(min(one_node, free)) // max(1, workers))


def node_types() -> list[dict[str, float]]:
    """The resources of each node type the cluster's autoscaler may add: read from the `ray up`
    config on the head node; empty where there is none (a cluster of `ray start` nodes)."""
    import yaml

    path = BOOTSTRAP_CONFIG.expanduser()
    if not path.is_file():
        return []
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    types = config.get("available_node_types") or {}
    return [
        dict(t.get("resources") or {})
        for t in types.values()
        if isinstance(t, dict) and t.get("max_workers", 1) != 0
    ]


def type_fits(bundle: dict[str, float], node_type: dict[str, float]) -> bool:
    """Whether a node of `node_type` could hold `bundle`: CPUs and memory a type leaves out are
    the instance's own (unknown here), so only what it states is compared."""
    known = {k: v for k, v in bundle.items() if k in node_type or k not in ("CPU", "memory")}
    return fits(known, node_type)


def describe(bundle: dict[str, float]) -> str:
    """``{CPU: 64, GPU: 1}``, for messages."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items() if v) + "}"


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    """What the nodes offer, e.g. ``2 node(s): {CPU: 2}, {CPU: 2, gpu_like: 1}``."""
    shown = [
        describe(
            {
                k: v
                for k, v in sorted(n.items())
                if not k.startswith(("node:", "accelerator_type")) and k not in _INTERNAL
            }
        )
        for n in nodes
    ]
    return f"{len(nodes)} node(s): {', '.join(shown) or 'none'}"


_INTERNAL = ("memory", "object_store_memory")
