// Range lookup and dispatch for the PIO and MMIO buses (see bus.hpp).
#include "devices/base/bus.hpp"

#include <algorithm>
#include <cstring>
#include <cstdio>
#include <mutex>
#include <stdexcept>

namespace kguest {

namespace {
std::string hex(std::uint64_t v) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "%#llx", static_cast<unsigned long long>(v));
    return buf;
}
} // namespace

void Bus::insert(std::uint64_t base, std::uint64_t len, std::shared_ptr<BusDevice> dev, std::string name) {
    if (len == 0 || base + len - 1 < base || !dev)
        throw std::invalid_argument(name_ + " bus: bad range at " + hex(base));
    std::unique_lock lock(mu_);
    // The first range starting after `base`, and the one before it, are the
    // only candidates for overlap.
    auto next = ranges_.upper_bound(base);
    if (next != ranges_.end() && next->first <= base + len - 1)
        throw std::invalid_argument(name_ + " bus: range " + hex(base) + "+" + hex(len) +
                                    " overlaps the device at " + hex(next->first));
    if (next != ranges_.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second.len - 1 >= base)
            throw std::invalid_argument(name_ + " bus: range " + hex(base) + "+" + hex(len) +
                                        " overlaps the device at " + hex(prev->first));
    }
    if (name.empty()) name = name_ + " " + hex(base);
    auto id = static_cast<std::uint32_t>(std::find(names_.begin(), names_.end(), name) - names_.begin());
    if (id == names_.size()) names_.push_back(std::move(name));
    ranges_.emplace(base, Range{len, std::move(dev), id});
}

std::string Bus::range_name(std::uint32_t range) const {
    std::shared_lock lock(mu_);
    return range < names_.size() ? names_[range] : std::string();
}

bool Bus::remove(std::uint64_t base) {
    std::unique_lock lock(mu_);
    return ranges_.erase(base) != 0;
}

const Bus::Range* Bus::find(std::uint64_t addr, std::uint64_t len, std::uint64_t& offset) const {
    if (len == 0 || addr + len - 1 < addr) return nullptr;
    auto it = ranges_.upper_bound(addr);
    if (it == ranges_.begin()) return nullptr;
    --it;
    offset = addr - it->first;
    if (offset >= it->second.len || len > it->second.len - offset) return nullptr;
    return &it->second;
}

bool Bus::read(std::uint64_t addr, std::span<std::uint8_t> data, std::uint32_t* range) const {
    std::shared_lock lock(mu_);
    std::uint64_t offset = 0;
    const Range* r = find(addr, data.size(), offset);
    if (r == nullptr) {
        std::memset(data.data(), 0xff, data.size());
        return false;
    }
    if (range != nullptr) *range = r->id;
    r->dev->read(offset, data);
    return true;
}

bool Bus::write(std::uint64_t addr, std::span<const std::uint8_t> data, std::uint32_t* range) const {
    std::shared_lock lock(mu_);
    std::uint64_t offset = 0;
    const Range* r = find(addr, data.size(), offset);
    if (r == nullptr) return false;
    if (range != nullptr) *range = r->id;
    r->dev->write(offset, data);
    return true;
}

} // namespace kguest
