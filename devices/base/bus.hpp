// A Bus maps address ranges (I/O ports or guest-physical MMIO) to devices, as
// in rust-vmm's vm-device; devices see offsets into their own range. An access
// not wholly inside one device's range is unclaimed: reads return all ones
// (a PC's floating bus) and writes are dropped.
//
// Each range has a name ("serial COM1"; by default the bus's name and the base)
// and a small id for it that read and write report, so exit statistics can say
// which device an access went to without a second lookup.
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
#include <vector>

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
    static constexpr std::uint32_t kNoRange = UINT32_MAX;
    explicit Bus(std::string name) : name_(std::move(name)) {}

    // Throws std::invalid_argument on an empty, wrapping or overlapping range.
    // Ranges with the same name share an id (a BAR moved keeps its id).
    void insert(std::uint64_t base, std::uint64_t len, std::shared_ptr<BusDevice> dev, std::string name = {});
    // Removes the range starting exactly at `base`; false if there is none.
    bool remove(std::uint64_t base);

    // False when unclaimed (data is then filled with 0xff / dropped). When
    // claimed and `range` is given, stores the id of the range's name there.
    bool read(std::uint64_t addr, std::span<std::uint8_t> data, std::uint32_t* range = nullptr) const;
    bool write(std::uint64_t addr, std::span<const std::uint8_t> data, std::uint32_t* range = nullptr) const;

    // The name behind a range id from read or write ("" for an unknown id).
    std::string range_name(std::uint32_t range) const;

private:
    struct Range {
        std::uint64_t len;
        std::shared_ptr<BusDevice> dev;
        std::uint32_t id;   // index into names_
    };
    // The range and offset for [addr, addr+len), or null.
    const Range* find(std::uint64_t addr, std::uint64_t len, std::uint64_t& offset) const;

    std::string name_;
    std::map<std::uint64_t, Range> ranges_;  // keyed by base
    std::vector<std::string> names_;         // never shrinks, so ids stay valid
    mutable std::shared_mutex mu_;
};

} // namespace kguest
