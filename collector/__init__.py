"""zencoder-collector: Zencoder usage analytics for many organizations, delivered where you work."""

__version__ = "0.1.0"
