// Placeholder until the FUSE export tests land.
