// The `--net` option of `kguest run`: parses its value into the NetConfig
// the machine opens a backend from (devices/net_backend.hpp).
#pragma once

#include "devices/net_backend.hpp"

#include <string_view>

namespace kguest {

// Parses `tap=IFNAME[,mac=XX:XX:XX:XX:XX:XX][,queues=N]` or `stream=PATH[,mac=...]`.
// Without mac=, the MAC is 52:54:00:12:34:56 plus `index` (among the --net
// options). Throws UsageError naming the problem.
NetConfig parse_net_spec(std::string_view spec, unsigned index = 0);

// XX:XX:XX:XX:XX:XX; false for anything else.
bool parse_mac(std::string_view s, MacAddress& mac);
// 52:54:00:12:34:56 plus `index`: the MAC of a device given none.
MacAddress default_mac(unsigned index);

} // namespace kguest
