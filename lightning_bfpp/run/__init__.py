"""The pipeline runtime: torch only, no Lightning (see :class:`~lightning_bfpp.run.pipeline.StagePipeline`)."""
