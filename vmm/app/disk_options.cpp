// `--disk` parsing (see disk_options.hpp).
#include "vmm/app/disk_options.hpp"

#include "devices/base/error.hpp"

#include <charconv>
#include <string>

namespace kguest {

namespace {

[[noreturn]] void bad_spec(std::string_view spec, const std::string& why) {
    throw UsageError("--disk " + std::string(spec) + ": " + why);
}

bool on_off(std::string_view spec, std::string_view key, std::string_view value) {
    if (value == "on") return true;
    if (value == "off") return false;
    bad_spec(spec, std::string(key) + "= wants on or off");
}

} // namespace

DiskConfig parse_disk_spec(std::string_view spec) {
    DiskConfig cfg;
    bool have_path = false, have_ro = false, have_serial = false, have_cache = false, have_queues = false,
         have_discard = false;
    auto once = [&](bool& seen, std::string_view key) {
        if (seen) bad_spec(spec, std::string(key) + "= given twice");
        seen = true;
    };
    if (spec.empty()) bad_spec(spec, "empty value (want path=FILE)");
    std::string_view rest = spec;
    while (true) {
        const std::size_t comma = rest.find(',');
        const std::string_view item = rest.substr(0, comma);
        const std::size_t eq = item.find('=');
        if (eq == std::string_view::npos) bad_spec(spec, "'" + std::string(item) + "' is not KEY=VALUE");
        const std::string_view key = item.substr(0, eq), value = item.substr(eq + 1);
        if (key == "path") {
            once(have_path, key);
            if (value.empty()) bad_spec(spec, "empty path");
            cfg.path = std::string(value);
        } else if (key == "readonly") {
            once(have_ro, key);
            cfg.readonly = on_off(spec, key, value);
        } else if (key == "serial") {
            once(have_serial, key);
            // 5.2.6: GET_ID answers 20 bytes; printable ASCII, as Linux shows it in sysfs.
            if (value.empty() || value.size() > kBlkIdBytes)
                bad_spec(spec, "serial= wants 1 to " + std::to_string(kBlkIdBytes) + " characters");
            for (char ch : value)
                if (ch < 0x21 || ch > 0x7e) bad_spec(spec, "serial= wants printable ASCII without spaces");
            cfg.serial = std::string(value);
        } else if (key == "cache") {
            once(have_cache, key);
            if (value == "none") cfg.cache = DiskConfig::Cache::none;
            else if (value == "writeback") cfg.cache = DiskConfig::Cache::writeback;
            else bad_spec(spec, "cache= wants none or writeback");
        } else if (key == "queues") {
            once(have_queues, key);
            unsigned n = 0;
            auto [end, ec] = std::from_chars(value.data(), value.data() + value.size(), n, 10);
            if (ec != std::errc() || end != value.data() + value.size() || n < 1 || n > kMaxBlkQueues)
                bad_spec(spec, "queues= wants a number from 1 to " + std::to_string(kMaxBlkQueues));
            cfg.queues = n;
        } else if (key == "discard") {
            once(have_discard, key);
            cfg.discard = on_off(spec, key, value);
        } else {
            bad_spec(spec, "unknown key '" + std::string(key) + "' (want path, readonly, serial, cache, queues, discard)");
        }
        if (comma == std::string_view::npos) break;
        rest = rest.substr(comma + 1);
    }
    if (!have_path) bad_spec(spec, "missing path=FILE");
    return cfg;
}

} // namespace kguest
