"""vfiod: brokers VFIO device assignment for virtual machines."""

__version__ = "0.1.0"
