// Parsing sizes from the command line: "256M", "2G", "4096", "64K".
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace kguest {

// Bytes, or nullopt for anything that is not a plain positive number with an
// optional K/M/G/T suffix (binary units; a trailing "iB" or "B" is accepted),
// or that overflows 64 bits.
std::optional<std::uint64_t> parse_size(std::string_view text);

// "256 MiB", "1.5 GiB", "4096 B": for messages.
std::string format_size(std::uint64_t bytes);

} // namespace kguest
