"""fedsplit: federated split learning and inference of large language models."""

__version__ = "0.1.0"
