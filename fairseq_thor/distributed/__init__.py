"""Expert parallelism: experts sharded over processes (fairscale MOELayer), sharded checkpoints."""
