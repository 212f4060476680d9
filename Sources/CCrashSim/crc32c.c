// CRC-32C with the SSE 4.2 `crc32` instruction where the CPU has it (about 8 bytes per 3 cycles, an
// order of magnitude faster than a table, which matters: the recorder checksums every byte written to a
// recorded disk), and a byte-at-a-time table elsewhere. Both give the same values.

#include "CCrashSim.h"

#include <pthread.h>
#include <string.h>

static uint32_t table[256];
static pthread_once_t tableOnce = PTHREAD_ONCE_INIT;

static void makeTable(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
}

static uint32_t software(uint32_t crc, const uint8_t *p, size_t n) {
    pthread_once(&tableOnce, makeTable);
    while (n--) crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t hardware(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = _mm_crc32_u64(c, word);
        p += 8;
        n -= 8;
    }
    while (n-- > 0) c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

uint32_t CCrashSim_crc32c(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = data;
    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2")) return ~hardware(crc, p, length);
#endif
    return ~software(crc, p, length);
}

uint32_t CCrashSim_crc32c_table(uint32_t crc, const void *data, size_t length) {
    return ~software(~crc, data, length);
}
