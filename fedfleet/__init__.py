"""fedfleet: deploy and run cross-silo federated learning across clouds."""

__version__ = "0.1.0"
