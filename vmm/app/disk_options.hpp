// The `--disk` option of `kguest run`: parses its value into the DiskConfig
// the machine opens a BlockImage from (devices/block_image.hpp).
#pragma once

#include "devices/block_image.hpp"

#include <string_view>

namespace kguest {

// Parses `path=FILE[,readonly=on|off][,serial=ID][,cache=none|writeback]
// [,queues=N][,discard=on|off]`. Throws UsageError naming the problem; the
// file itself is checked when the machine opens it.
DiskConfig parse_disk_spec(std::string_view spec);

} // namespace kguest
