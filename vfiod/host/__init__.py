"""The host side: PCI devices and IOMMU groups in sysfs, and driver binding."""
