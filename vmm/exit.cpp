// Exit decoding, dispatch and statistics (see exit.hpp).
#include "vmm/exit.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>
#include <unistd.h>

namespace kguest {

DecodedExit decode_exit(kvm_run& run, std::size_t run_size) {
    DecodedExit e;
    e.reason = run.exit_reason;
    switch (run.exit_reason) {
    case KVM_EXIT_IO: {
        e.kind = ExitKind::io;
        e.write = run.io.direction == KVM_EXIT_IO_OUT;
        e.addr = run.io.port;
        e.size = run.io.size;
        e.count = run.io.count;
        // KVM batches `rep ins/outs` into one exit with count elements at
        // data_offset; checked to fit the page rather than trusted.
        std::uint64_t bytes = std::uint64_t(e.size) * e.count;
        if ((e.size != 1 && e.size != 2 && e.size != 4) || run.io.data_offset > run_size ||
            bytes > run_size - run.io.data_offset) {
            e.kind = ExitKind::malformed;
            break;
        }
        e.data = reinterpret_cast<std::uint8_t*>(&run) + run.io.data_offset;
        break;
    }
    case KVM_EXIT_MMIO:
        e.kind = ExitKind::mmio;
        e.write = run.mmio.is_write != 0;
        e.addr = run.mmio.phys_addr;
        e.size = run.mmio.len;
        e.count = 1;
        e.data = run.mmio.data;
        if (e.size == 0 || e.size > sizeof run.mmio.data) e.kind = ExitKind::malformed;
        break;
    case KVM_EXIT_HLT: e.kind = ExitKind::hlt; break;
    case KVM_EXIT_SHUTDOWN: e.kind = ExitKind::shutdown; break;
    case KVM_EXIT_SYSTEM_EVENT:
        e.kind = ExitKind::system_event;
        e.detail = run.system_event.type;
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        e.kind = ExitKind::internal_error;
        e.detail = run.internal.suberror;
        e.count = run.internal.ndata;
        if (run.internal.ndata > 0) e.addr = run.internal.data[0];
        break;
    case KVM_EXIT_FAIL_ENTRY:
        e.kind = ExitKind::fail_entry;
        e.detail = run.fail_entry.hardware_entry_failure_reason;
        break;
    case KVM_EXIT_INTR: e.kind = ExitKind::intr; break;
    default: e.kind = ExitKind::unknown; break;
    }
    return e;
}

static RateLimit unclaimed_pio_log, unclaimed_mmio_log, odd_exit_log;

ExitOutcome handle_exit(const DecodedExit& e, const Bus& pio, const Bus& mmio, unsigned vcpu_id) {
    switch (e.kind) {
    case ExitKind::io:
    case ExitKind::mmio: {
        const Bus& bus = e.kind == ExitKind::io ? pio : mmio;
        ExitOutcome out;
        bool claimed = true;
        for (std::uint32_t i = 0; i < e.count; ++i) {
            std::uint8_t* p = e.data + std::size_t(i) * e.size;
            claimed = e.write ? bus.write(e.addr, {p, e.size}, &out.range)
                              : bus.read(e.addr, {p, e.size}, &out.range);
            if (!claimed) {
                // Fill (or drop) the rest of a rep batch without a lookup each.
                if (!e.write)
                    for (std::uint32_t j = i + 1; j < e.count; ++j)
                        bus.read(e.addr, {e.data + std::size_t(j) * e.size, e.size});
                break;
            }
        }
        if (!claimed) {
            if (e.kind == ExitKind::io)
                KGUEST_LOG_LIMITED(unclaimed_pio_log, "vCPU %u: unclaimed port %s %#llx (size %u, count %u)",
                                   vcpu_id, e.write ? "write" : "read",
                                   static_cast<unsigned long long>(e.addr), e.size, e.count);
            else
                KGUEST_LOG_LIMITED(unclaimed_mmio_log, "vCPU %u: unclaimed MMIO %s %#llx (size %u)", vcpu_id,
                                   e.write ? "write" : "read", static_cast<unsigned long long>(e.addr), e.size);
        }
        return out;
    }
    case ExitKind::intr: return {};
    case ExitKind::hlt: return {ExitOutcome::halt, 0};
    case ExitKind::shutdown:
        log_msg("vCPU %u: guest triple fault (KVM_EXIT_SHUTDOWN); stopping the VM", vcpu_id);
        return {ExitOutcome::stop, 1};
    case ExitKind::system_event:
        // Like Firecracker, a reboot request ends the VM: nothing to reboot into.
        if (e.detail == KVM_SYSTEM_EVENT_SHUTDOWN || e.detail == KVM_SYSTEM_EVENT_RESET)
            return {ExitOutcome::stop, 0};
        log_msg("vCPU %u: guest system event %llu (crash or unknown); stopping the VM", vcpu_id,
                static_cast<unsigned long long>(e.detail));
        return {ExitOutcome::stop, 1};
    case ExitKind::internal_error:
        log_msg("vCPU %u: KVM internal error, suberror %llu (%u data words, first %#llx); stopping the VM",
                vcpu_id, static_cast<unsigned long long>(e.detail), e.count,
                static_cast<unsigned long long>(e.addr));
        return {ExitOutcome::stop, 1};
    case ExitKind::fail_entry:
        log_msg("vCPU %u: KVM_EXIT_FAIL_ENTRY, hardware reason %#llx; stopping the VM", vcpu_id,
                static_cast<unsigned long long>(e.detail));
        return {ExitOutcome::stop, 1};
    case ExitKind::malformed:
        KGUEST_LOG_LIMITED(odd_exit_log, "vCPU %u: malformed exit (reason %u, size %u, count %u) ignored",
                           vcpu_id, e.reason, e.size, e.count);
        return {};
    case ExitKind::unknown:
        log_msg("vCPU %u: unexpected exit reason %u; stopping the VM", vcpu_id, e.reason);
        return {ExitOutcome::stop, 1};
    }
    return {};
}

namespace {
// A reason: the exit kind, whether a bus range claimed it, and that range's
// id, the unclaimed port, or the unknown exit reason.
std::uint64_t exit_key(const DecodedExit& e, const ExitOutcome& out) {
    const bool claimed = out.range != Bus::kNoRange;
    const std::uint64_t low = claimed ? out.range
                              : e.kind == ExitKind::io      ? e.addr
                              : e.kind == ExitKind::unknown ? e.reason : 0;
    return std::uint64_t(e.kind) << 33 | std::uint64_t(claimed) << 32 | low;
}

std::string reason_of(std::uint64_t key, const Bus& pio, const Bus& mmio) {
    static constexpr const char* kKinds[] = {"port I/O",   "MMIO",       "hlt",  "shutdown", "system event",
                                             "internal error", "fail entry", "intr", "malformed", "unknown"};
    static_assert(std::size(kKinds) == std::size_t(ExitKind::unknown) + 1);
    const auto kind = static_cast<ExitKind>(key >> 33);
    const auto low = static_cast<std::uint32_t>(key);
    if (key >> 32 & 1) return (kind == ExitKind::io ? pio : mmio).range_name(low);
    char buf[40];
    if (kind == ExitKind::io) std::snprintf(buf, sizeof buf, "unclaimed port %#x", low);
    else if (kind == ExitKind::mmio) return "unclaimed MMIO";
    else if (kind == ExitKind::unknown) std::snprintf(buf, sizeof buf, "exit reason %u", low);
    else return kKinds[std::size_t(kind)];
    return buf;
}
} // namespace

void ExitCounter::record(const DecodedExit& e, const ExitOutcome& out, std::uint64_t handling_ticks) {
    const std::uint64_t key = exit_key(e, out);
    if (key != last_key_) {
        auto it = entries_.find(key);
        if (it == entries_.end()) {
            std::lock_guard lock(insert_mu_);
            it = entries_.try_emplace(key).first;
        }
        last_key_ = key;
        last_ = &it->second;
    }
    Entry& en = *last_;
    en.count.store(en.count.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    en.ticks.store(en.ticks.load(std::memory_order_relaxed) + handling_ticks, std::memory_order_relaxed);
}

std::vector<ExitCount> ExitCounter::sum(const std::deque<ExitCounter>& counters, const Bus& pio,
                                        const Bus& mmio, double ns_per_tick) {
    std::map<std::uint64_t, ExitCount> by_key;
    for (const ExitCounter& c : counters) {
        std::lock_guard lock(c.insert_mu_);
        for (const auto& [key, en] : c.entries_) {
            ExitCount& x = by_key[key];
            x.count += en.count.load(std::memory_order_relaxed);
            x.handling_ns += static_cast<std::uint64_t>(
                static_cast<double>(en.ticks.load(std::memory_order_relaxed)) * ns_per_tick);
        }
    }
    std::vector<ExitCount> out;
    for (auto& [key, x] : by_key) {
        x.reason = reason_of(key, pio, mmio);
        out.push_back(std::move(x));
    }
    std::stable_sort(out.begin(), out.end(),
                     [](const ExitCount& a, const ExitCount& b) { return a.count > b.count; });
    return out;
}

std::vector<KvmStat> parse_kvm_stats(std::span<const std::uint8_t> f) {
    kvm_stats_header h;
    if (f.size() < sizeof h) throw std::runtime_error("KVM stats: no header");
    std::memcpy(&h, f.data(), sizeof h);
    // Each descriptor is followed by its name (name_size bytes, NUL-padded).
    constexpr std::size_t kDesc = offsetof(kvm_stats_desc, name);
    const std::uint64_t stride = kDesc + std::uint64_t{h.name_size};
    auto truncated = [](const char* what, std::uint32_t i) {
        return std::runtime_error("KVM stats: " + std::string(what) + " " + std::to_string(i) + " truncated");
    };
    std::vector<KvmStat> out;
    for (std::uint32_t i = 0; i < h.num_desc; ++i) {
        const std::uint64_t at = h.desc_offset + i * stride;
        kvm_stats_desc d;
        if (at + stride > f.size()) throw truncated("descriptor", i);
        std::memcpy(&d, f.data() + at, kDesc);
        // Histograms and peak or instant values are not counts of events.
        if ((d.flags & KVM_STATS_TYPE_MASK) != KVM_STATS_TYPE_CUMULATIVE || d.size != 1) continue;
        const std::uint64_t value_at = std::uint64_t{h.data_offset} + d.offset;
        if (value_at + 8 > f.size()) throw truncated("value", i);
        const char* name = reinterpret_cast<const char*>(f.data() + at + kDesc);
        KvmStat st{std::string(name, strnlen(name, h.name_size)), 0};
        std::memcpy(&st.value, f.data() + value_at, 8);
        out.push_back(std::move(st));
    }
    return out;
}

std::vector<KvmStat> read_kvm_stats(int stats_fd) {
    // KVM hands out the whole file in one read (a vCPU's is a few KiB).
    std::vector<std::uint8_t> buf(1 << 16);
    const ssize_t n = ::pread(stats_fd, buf.data(), buf.size(), 0);
    if (n < 0) throw_errno("pread KVM stats fd");
    return parse_kvm_stats({buf.data(), static_cast<std::size_t>(n)});
}

void add_kvm_stats(std::vector<KvmStat>& into, const std::vector<KvmStat>& from) {
    for (const KvmStat& s : from) {
        auto it = std::find_if(into.begin(), into.end(), [&](const KvmStat& x) { return x.name == s.name; });
        if (it == into.end()) into.push_back(s);
        else it->value += s.value;
    }
}

} // namespace kguest
