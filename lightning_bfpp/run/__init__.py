"""The pipeline runtime: executor, transfers, data parallelism, ties, clipping, checkpoint format. No Lightning."""
