"""The Lightning side: the strategy, its checkpoints, the log relay, the module base class and Lightning internals."""
