"""The worker service: joins a master, receives its plan and shard, runs its layers."""
