// Little-endian reads of byte images (ACPI tables, AML) for the tests that
// parse what the VMM builds.
#pragma once

#include <cstdint>
#include <vector>

namespace kguest {

using Bytes = std::vector<std::uint8_t>;

// The n-byte little-endian integer at p (n <= 8).
inline std::uint64_t le(const std::uint8_t* p, unsigned n) {
    std::uint64_t v = 0;
    for (unsigned i = 0; i < n; ++i) v |= std::uint64_t{p[i]} << (8 * i);
    return v;
}

} // namespace kguest
