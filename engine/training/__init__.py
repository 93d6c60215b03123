"""The DeepSpeed runtime: the stage loop, engines and placements, DeepSpeed configs, batches, snapshots."""
