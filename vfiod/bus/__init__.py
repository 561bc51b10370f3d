"""The D-Bus edge: thin sdbus adapters over the broker."""
