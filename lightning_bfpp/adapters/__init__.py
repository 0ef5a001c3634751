"""Adapters that wrap popular model libraries as PipelineModules."""
