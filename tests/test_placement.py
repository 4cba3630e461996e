"""Placement against single nodes (pipeline.cluster): what fits, what no node can hold."""

from pipeline import cluster

NODES = [{"CPU": 2.0, "memory": 4e9, "node:127.0.0.1": 1.0}, {"CPU": 2.0, "gpu_like": 1.0}]


def test_a_bundle_fits_one_node_not_the_sum_of_nodes():
    assert cluster.fits({"CPU": 2}, NODES[0])
    assert not cluster.fits({"CPU": 4}, NODES[0])  # the cluster has 4 CPUs, no node has
    assert cluster.unplaceable([{"CPU": 2}, {"CPU": 4}], NODES) == {"CPU": 4}
    assert cluster.unplaceable([{"CPU": 1, "gpu_like": 1}], NODES) is None
    assert cluster.unplaceable([{"CPU": 1, "GPU": 1}], NODES) == {"CPU": 1, "GPU": 1}
    assert cluster.fits({"GPU": 0, "CPU": 1}, NODES[0])  # zero amounts always fit


def test_node_types_of_the_launcher_config(tmp_path, monkeypatch):
    config = tmp_path / "bootstrap.yaml"
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", config)
    assert cluster.node_types() == []  # a cluster of `ray start` nodes: none it can add
    config.write_text(
        "available_node_types:\n"
        "  head: {resources: {}, node_config: {}}\n"
        "  gpu: {resources: {GPU: 1}, max_workers: 4, node_config: {}}\n"
        "  off: {resources: {TPU: 4}, max_workers: 0, node_config: {}}\n"
    )
    types = cluster.node_types()
    assert types == [{}, {"GPU": 1}]
    # a type that leaves its CPUs to the instance can hold any CPU count; stated ones count
    assert cluster.type_fits({"CPU": 8, "GPU": 1}, {"GPU": 1})
    assert not cluster.type_fits({"CPU": 1, "GPU": 2}, {"GPU": 1})
    assert not any(cluster.type_fits({"TPU": 1}, t) for t in types)


def test_messages_show_what_nodes_offer():
    assert cluster.describe({"CPU": 64.0, "GPU": 0}) == "{CPU: 64}"
    assert cluster.describe_nodes(NODES) == "2 node(s): {CPU: 2}, {CPU: 2, gpu_like: 1}"
