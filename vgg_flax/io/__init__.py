"""Storage: one file API for local disks and buckets (`storage`)."""
