// A Bus maps address ranges (I/O ports or guest-physical MMIO) to devices, as
// in rust-vmm's vm-device; devices see offsets into their own range. An access
// not wholly inside one device's range is unclaimed: reads return all ones
// (a PC's floating bus) and writes are dropped.
//
// Lookups take a shared lock, so vCPU threads dispatch in parallel; inserts
// and removals (setup, PCI BAR moves) take it exclusively.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>
#include <string>

namespace kguest {

class BusDevice {
public:
    virtual ~BusDevice() = default;
    // `offset` is relative to the base the device was inserted at; data.size()
    // is the access width (1, 2, 4 or 8; any width for a hostile guest).
    virtual void read(std::uint64_t offset, std::span<std::uint8_t> data) = 0;
    virtual void write(std::uint64_t offset, std::span<const std::uint8_t> data) = 0;
};

class Bus {
public:
    explicit Bus(std::string name) : name_(std::move(name)) {}

    // Throws std::invalid_argument on an empty, wrapping or overlapping range.
    void insert(std::uint64_t base, std::uint64_t len, std::shared_ptr<BusDevice> dev);
    // Removes the range starting exactly at `base`; false if there is none.
    bool remove(std::uint64_t base);

    // False when unclaimed (data is then filled with 0xff / dropped).
    bool read(std::uint64_t addr, std::span<std::uint8_t> data) const;
    bool write(std::uint64_t addr, std::span<const std::uint8_t> data) const;

private:
    struct Range {
        std::uint64_t len;
        std::shared_ptr<BusDevice> dev;
    };
    // The device and offset for [addr, addr+len), or null.
    BusDevice* find(std::uint64_t addr, std::uint64_t len, std::uint64_t& offset) const;

    std::string name_;
    std::map<std::uint64_t, Range> ranges_;  // keyed by base
    mutable std::shared_mutex mu_;
};

} // namespace kguest
