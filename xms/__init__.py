"""xms: durable VM disk migration into block storage, on Temporal."""

__version__ = "0.1.0"
