"""The code behind the example Hydra apps in ``examples/``: models, data, config schemas and the training run."""
