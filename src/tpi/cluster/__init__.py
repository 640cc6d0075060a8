"""The cluster: what runs every device's shard (base: in-process; remote: the master and
worker halves over the network), and what builds and rebuilds it (manager, launch), with the
registry, membership, capability probes, planner and shard delivery beside them."""
from tpi.cluster.base import Cluster, InProcCluster

__all__ = ["Cluster", "InProcCluster"]
