/* check_bytes.h: the byte checks the CI test programs share. Include it
 * after check.h or check_driver.h (it reports through their `fail`). Every
 * byte a program moves through the device is compared, and counted in
 * `bytes_checked`. */
#pragma once

#include <stdint.h>
#include <stdio.h>

#define REQUIRE(cond, ...)                                                    \
    do {                                                                      \
        if (!(cond)) {                                                        \
            char m_[512];                                                     \
            snprintf(m_, sizeof m_, __VA_ARGS__);                             \
            fail("line %d: %s", __LINE__, m_);                                \
        }                                                                     \
    } while (0)

static unsigned long long bytes_checked;

// Per-buffer pattern without a period of 4, so dropped, repeated or shifted
// bytes cannot match by accident.
static void fill(unsigned char *p, size_t n, unsigned seed)
{
    uint32_t x = seed * 2654435761u + 12345u;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (unsigned char)(x >> 24);
    }
}

static void expect_bytes(const char *what, const unsigned char *got,
                         const unsigned char *want, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i])
            fail("%s: byte %zu of %zu is 0x%02x, expected 0x%02x", what, i, n,
                 got[i], want[i]);
    bytes_checked += n;
}

__attribute__((unused)) static void expect_value(const char *what, const unsigned char *got, size_t n,
                         unsigned char v)
{
    for (size_t i = 0; i < n; i++)
        if (got[i] != v)
            fail("%s: byte %zu of %zu is 0x%02x, expected 0x%02x", what, i, n,
                 got[i], v);
    bytes_checked += n;
}
