// Placeholder until the FUSE export lands.
