// The boot timeline (see timeline.hpp).
#include "devices/base/timeline.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <ctime>
#include <string_view>
#include <utility>
#include <vector>

namespace kguest {

namespace {
std::int64_t now_ns() {
    timespec ts{};
    ::clock_gettime(CLOCK_MONOTONIC, &ts);   // cannot fail for this clock
    return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

// Static initialisation of a static binary runs right after exec.
const std::int64_t g_start = now_ns();
std::array<std::atomic<std::int64_t>, static_cast<std::size_t>(BootStep::count)> g_steps{};

constexpr std::array<const char*, static_cast<std::size_t>(BootStep::count)> kNames = {
    "guest RAM mapped", "kernel loaded", "KVM ready (VM, irqchip, PIT)", "VM built (slots, devices, vCPUs)",
    "first KVM_RUN", "first serial byte", "first line from init"};

// The console line being written (a prefix is enough to match), and whether
// Linux has said it runs init ("Run /init as init process", init/main.c).
std::array<char, 160> g_line{};
std::size_t g_line_len = 0;
bool g_init_started = false;
} // namespace

void boot_step(BootStep step) {
    auto& slot = g_steps[static_cast<std::size_t>(step)];
    if (slot.load(std::memory_order_relaxed) != 0) return;
    std::int64_t expected = 0;
    slot.compare_exchange_strong(expected, std::max<std::int64_t>(now_ns() - g_start, 1));
}

void boot_console_output(std::uint8_t byte) {
    boot_step(BootStep::first_serial_byte);
    if (g_steps[static_cast<std::size_t>(BootStep::init_first_line)].load(std::memory_order_relaxed) != 0) return;
    if (byte != '\n') {
        if (byte != '\r' && g_line_len < g_line.size()) g_line[g_line_len++] = static_cast<char>(byte);
        return;
    }
    const std::string_view line(g_line.data(), g_line_len);
    g_line_len = 0;
    if (line.empty()) return;
    // The first whole line after the kernel's: init's own, unless a kernel
    // message slips in between (it then stands for init's, a little early).
    if (g_init_started) boot_step(BootStep::init_first_line);
    else if (line.find(" as init process") != std::string_view::npos) g_init_started = true;
}

std::string boot_timeline_report() {
    std::vector<std::pair<std::int64_t, const char*>> reached;
    for (std::size_t i = 0; i < g_steps.size(); ++i)
        if (std::int64_t t = g_steps[i].load(); t != 0) reached.emplace_back(t, kNames[i]);
    std::sort(reached.begin(), reached.end());
    std::string out = "boot timeline (ms since process start, +ms since the step before):\n";
    std::int64_t prev = 0;
    for (const auto& [t, name] : reached) {
        char buf[128];
        std::snprintf(buf, sizeof buf, "  %10.3f  %+10.3f  %s\n", static_cast<double>(t) / 1e6,
                      static_cast<double>(t - prev) / 1e6, name);
        out += buf;
        prev = t;
    }
    return out;
}

} // namespace kguest
