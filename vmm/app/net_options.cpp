// `--net` parsing (see net_options.hpp).
#include "vmm/app/net_options.hpp"

#include "devices/base/error.hpp"

#include <charconv>
#include <net/if.h>
#include <string>
#include <sys/un.h>

namespace kguest {

namespace {

[[noreturn]] void bad_spec(std::string_view spec, const std::string& why) {
    throw UsageError("--net " + std::string(spec) + ": " + why);
}

// Linux's dev_valid_name(): 1..15 bytes, no '/', ':' or whitespace, not "." or "..".
std::string check_ifname(std::string_view spec, std::string_view name) {
    if (name.empty()) bad_spec(spec, "empty interface name");
    if (name.size() >= IFNAMSIZ)
        bad_spec(spec, "interface name '" + std::string(name) + "' is longer than 15 characters");
    if (name == "." || name == ".." ||
        name.find_first_of("/: \t\n\r\f\v") != std::string_view::npos)
        bad_spec(spec, "invalid interface name '" + std::string(name) + "'");
    return std::string(name);
}

} // namespace

bool parse_mac(std::string_view s, MacAddress& mac) {
    if (s.size() != 17) return false;
    for (std::size_t i = 0; i < 6; ++i) {
        const char* p = s.data() + 3 * i;
        if (i < 5 && p[2] != ':') return false;
        unsigned v = 0;
        auto [end, ec] = std::from_chars(p, p + 2, v, 16);
        if (ec != std::errc() || end != p + 2) return false;
        mac[i] = static_cast<std::uint8_t>(v);
    }
    return true;
}

MacAddress default_mac(unsigned index) {
    // 52:54:00 is QEMU's locally administered prefix; the low 24 bits
    // count up from 12:34:56 with the device index.
    const std::uint32_t low = (0x123456u + index) & 0xffffff;
    return {0x52, 0x54, 0x00, static_cast<std::uint8_t>(low >> 16), static_cast<std::uint8_t>(low >> 8),
            static_cast<std::uint8_t>(low)};
}

NetConfig parse_net_spec(std::string_view spec, unsigned index) {
    NetConfig cfg;
    bool have_kind = false, have_mac = false, have_queues = false;
    std::string_view rest = spec;
    if (spec.empty()) bad_spec(spec, "empty value (want tap=IFNAME or stream=PATH)");
    while (true) {
        const std::size_t comma = rest.find(',');
        const std::string_view item = rest.substr(0, comma);
        const std::size_t eq = item.find('=');
        if (eq == std::string_view::npos) bad_spec(spec, "'" + std::string(item) + "' is not KEY=VALUE");
        const std::string_view key = item.substr(0, eq), value = item.substr(eq + 1);
        if (key == "tap" || key == "stream") {
            if (have_kind) bad_spec(spec, "more than one of tap= and stream=");
            have_kind = true;
            if (key == "tap") {
                cfg.kind = NetConfig::Kind::tap;
                cfg.target = check_ifname(spec, value);
            } else {
                cfg.kind = NetConfig::Kind::stream;
                if (value.empty()) bad_spec(spec, "empty socket path");
                if (value.size() >= sizeof(sockaddr_un::sun_path))
                    bad_spec(spec, "socket path longer than " + std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                                       " bytes");
                cfg.target = std::string(value);
            }
        } else if (key == "mac") {
            if (have_mac) bad_spec(spec, "mac= given twice");
            have_mac = true;
            if (!parse_mac(value, cfg.mac))
                bad_spec(spec, "bad MAC address '" + std::string(value) + "' (want XX:XX:XX:XX:XX:XX)");
            if (cfg.mac[0] & 1) bad_spec(spec, "MAC address " + std::string(value) + " is multicast");
            if (cfg.mac == MacAddress{}) bad_spec(spec, "MAC address is all zeros");
        } else if (key == "queues") {
            if (have_queues) bad_spec(spec, "queues= given twice");
            have_queues = true;
            unsigned n = 0;
            auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n, 10);
            if (ec != std::errc() || end != value.data() + value.size() || n < 1 || n > kMaxNetQueuePairs)
                bad_spec(spec, "queues= wants a number from 1 to " + std::to_string(kMaxNetQueuePairs));
            cfg.queue_pairs = n;
        } else {
            bad_spec(spec, "unknown key '" + std::string(key) + "' (want tap, stream, mac, queues)");
        }
        if (comma == std::string_view::npos) break;
        rest = rest.substr(comma + 1);
    }
    if (!have_kind) bad_spec(spec, "missing tap=IFNAME or stream=PATH");
    if (have_queues && cfg.kind != NetConfig::Kind::tap) bad_spec(spec, "queues= is only for tap");
    if (!have_mac) cfg.mac = default_mac(index);
    return cfg;
}

} // namespace kguest
