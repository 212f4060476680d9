// CRC32C (Castagnoli), for VIMG's end-to-end checksums (docs/FORMAT.md, "End-to-end checksums"): the
// SSE 4.2 crc32 instruction where the CPU has it, else a table-driven loop (slicing by 8). Both give the
// same values; the caller passes the running CRC (start with 0xFFFFFFFF, finish by inverting).
#include "CBlockIO.h"

#include <stdint.h>
#include <string.h>

static uint32_t crc32c_table[8][256];
static int crc32c_ready;
static int crc32c_hardware;

static void crc32c_init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++) crc = crc & 1 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
        crc32c_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = crc32c_table[0][n];
        for (int k = 1; k < 8; k++) {
            crc = crc32c_table[0][crc & 0xFF] ^ (crc >> 8);
            crc32c_table[k][n] = crc;
        }
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc32c_hardware = __builtin_cpu_supports("sse4.2");
#endif
    __atomic_store_n(&crc32c_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc32c_software(uint32_t crc, const uint8_t *p, size_t length) {
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        word ^= crc;
        crc = crc32c_table[7][word & 0xFF] ^ crc32c_table[6][(word >> 8) & 0xFF] ^
              crc32c_table[5][(word >> 16) & 0xFF] ^ crc32c_table[4][(word >> 24) & 0xFF] ^
              crc32c_table[3][(word >> 32) & 0xFF] ^ crc32c_table[2][(word >> 40) & 0xFF] ^
              crc32c_table[1][(word >> 48) & 0xFF] ^ crc32c_table[0][word >> 56];
        p += 8;
        length -= 8;
    }
    while (length--) crc = crc32c_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hardware_update(uint32_t crc, const uint8_t *p, size_t length) {
    uint64_t c = crc;
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        length -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (length--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}
#endif

uint32_t CBlockIO_crc32c(uint32_t crc, const void *data, size_t length) {
    if (!__atomic_load_n(&crc32c_ready, __ATOMIC_ACQUIRE)) crc32c_init();
#if defined(__x86_64__)
    if (crc32c_hardware) return crc32c_hardware_update(crc, data, length);
#endif
    return crc32c_software(crc, data, length);
}

uint32_t CBlockIO_crc32c_portable(uint32_t crc, const void *data, size_t length) {
    if (!__atomic_load_n(&crc32c_ready, __ATOMIC_ACQUIRE)) crc32c_init();
    return crc32c_software(crc, data, length);
}

int CBlockIO_crc32c_is_hardware(void) {
    if (!__atomic_load_n(&crc32c_ready, __ATOMIC_ACQUIRE)) crc32c_init();
    return crc32c_hardware;
}
