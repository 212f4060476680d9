// CRC-32C for the write log's checksums (Sources/CrashSim/WriteLog.swift, the only user).
#ifndef CCRASHSIM_H
#define CCRASHSIM_H

#include <stddef.h>
#include <stdint.h>

/// Continues `crc` (the CRC-32C of earlier bytes, 0 to start) over `length` bytes at `data`: the CRC-32C
/// (Castagnoli, reflected polynomial 0x82F63B78, as iSCSI and ext4 use) of the concatenation.
uint32_t CCrashSim_crc32c(uint32_t crc, const void *data, size_t length);

/// The same, always from the table (what CPUs without the instruction use), for tests.
uint32_t CCrashSim_crc32c_table(uint32_t crc, const void *data, size_t length);

#endif
