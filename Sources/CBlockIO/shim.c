// Empty: the module is header-only (include/CBlockIO.h).
