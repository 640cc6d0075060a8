"""Checkpoint readers, the splitter, the shard store and the sliding-window scheduler."""
