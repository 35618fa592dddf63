"""Storage: one file API for local disks and buckets (`storage`), the GCS clients under it
and their one deadline (`clients`), files changed by compare-and-swap (`versioned`) and the
run folder's layout (`workdirs`)."""
