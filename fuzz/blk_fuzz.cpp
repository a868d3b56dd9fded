// libFuzzer target: the virtio-blk device (devices/virtio_blk.*, VIRTIO 1.2
// section 5.2) on its event loop and io_uring, driven by the fake driver of
// the unit tests (tests/support/fake_virtio.hpp) over 1..4 request queues in
// a 16 MiB guest, on a small temporary raw image (64 KiB, rewritten with
// zeroes before each input so that inputs replay alike). Each input makes a
// fresh device with the options and features it picks, then plays a script:
// request chains (header with any type and sector, DISCARD/WRITE_ZEROES
// segments, data buffers of any length and direction, a status byte or
// not), direct or indirect, raw hostile descriptors, kicks (each waits for
// the loop to settle), the driver taking used elements, config-space
// accesses (writeback toggles), counters and device resets. Nothing may
// crash, hit UB or hang (libFuzzer's -timeout); afterwards the image file
// must have its size still (5.2.6: requests beyond the capacity fail, the
// file never grows) and, when the disk was read-only, its contents.
// Threads: libFuzzer's one thread plus the device's loop thread.
#include "devices/virtio_blk.hpp"

#include "tests/support/fake_virtio.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <fuzzer/FuzzedDataProvider.h>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

using namespace kguest;

namespace {

constexpr std::uint16_t kRing = 64;
constexpr std::uint64_t kRam = 16 << 20;
constexpr std::uint64_t kImage = 64 << 10;   // 128 sectors
constexpr std::uint64_t kSectors = kImage / 512;
constexpr unsigned kMaxQueues = 4;
constexpr std::uint64_t kData = 0x100000, kDataPerQueue = 0x380000;   // each queue's bump area

GuestMemory& memory() {
    static GuestMemory mem(kRam, Backing::off);
    return mem;
}

// The image file, created once and unlinked at exit.
struct Image {
    std::string path;
    int fd = -1;
    Image() {
        const char* dir = std::getenv("TMPDIR");
        path = std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/kguest-fuzz-blk-XXXXXX";
        fd = ::mkstemp(path.data());
        if (fd < 0) __builtin_trap();
    }
    ~Image() {
        ::close(fd);
        ::unlink(path.c_str());
    }
    void zero() const {
        static const std::vector<std::uint8_t> z(kImage);
        if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, z.data(), z.size(), 0) != static_cast<ssize_t>(z.size()))
            __builtin_trap();
    }
    std::uint64_t size() const {
        struct stat st {};
        if (::fstat(fd, &st) != 0) __builtin_trap();
        return static_cast<std::uint64_t>(st.st_size);
    }
    std::vector<std::uint8_t> contents() const {
        std::vector<std::uint8_t> v(kImage + 1);
        const ssize_t n = ::pread(fd, v.data(), v.size(), 0);
        if (n < 0) __builtin_trap();
        v.resize(static_cast<std::size_t>(n));
        return v;
    }
};

Image& image() {
    static Image img;
    return img;
}

std::uint64_t sector(FuzzedDataProvider& in) {
    return in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint64_t>(0, kSectors + 8) : in.ConsumeIntegral<std::uint64_t>();
}

// A request's readable head: the 16-byte header, maybe cut short, and for
// DISCARD/WRITE_ZEROES 0..3 segments.
std::vector<std::uint8_t> header(FuzzedDataProvider& in) {
    static constexpr std::uint32_t kTypes[] = {VIRTIO_BLK_T_IN,      VIRTIO_BLK_T_OUT,          VIRTIO_BLK_T_FLUSH,
                                               VIRTIO_BLK_T_GET_ID,  VIRTIO_BLK_T_DISCARD,      VIRTIO_BLK_T_WRITE_ZEROES};
    const std::uint32_t type = in.ConsumeBool() ? kTypes[in.ConsumeIntegralInRange<std::size_t>(0, 5)]
                                                : in.ConsumeIntegral<std::uint32_t>();
    VirtioBlkReqHdr h{type, in.ConsumeBool() ? 0u : in.ConsumeIntegral<std::uint32_t>(), sector(in)};
    std::vector<std::uint8_t> b(reinterpret_cast<const std::uint8_t*>(&h), reinterpret_cast<const std::uint8_t*>(&h) + 16);
    if (type == VIRTIO_BLK_T_DISCARD || type == VIRTIO_BLK_T_WRITE_ZEROES) {
        const int n = in.ConsumeIntegralInRange<int>(0, 3);
        for (int i = 0; i < n; ++i) {
            VirtioBlkDiscardSeg g{sector(in),
                                  in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint32_t>(0, kSectors + 8)
                                                   : in.ConsumeIntegral<std::uint32_t>(),
                                  in.ConsumeBool() ? 0u : in.ConsumeIntegral<std::uint32_t>()};
            b.insert(b.end(), reinterpret_cast<const std::uint8_t*>(&g), reinterpret_cast<const std::uint8_t*>(&g) + 16);
        }
    }
    if (in.ConsumeIntegralInRange<int>(0, 7) == 0) b.resize(in.ConsumeIntegralInRange<std::size_t>(0, b.size()));
    return b;
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    FuzzedDataProvider in(data, size);
    GuestMemory& mem = memory();
    Image& img = image();
    img.zero();
    DiskConfig cfg;
    cfg.path = img.path;
    cfg.readonly = in.ConsumeBool();
    cfg.discard = in.ConsumeBool();
    cfg.queues = in.ConsumeIntegralInRange<unsigned>(1, kMaxQueues);
    const std::vector<std::uint8_t> before = img.contents();
    {
        fake::Transport tr;
        VirtioBlk dev(std::make_unique<BlockImage>(cfg), cfg.queues, cfg.discard);
        dev.attach(&tr);
        // The driver accepts any subset of what is offered.
        const std::uint64_t features =
            (dev.device_features() & in.ConsumeIntegral<std::uint64_t>()) | virtio_bit(VIRTIO_F_VERSION_1);
        tr.features = features;

        std::vector<Virtqueue> vqs;
        vqs.reserve(dev.num_queues());
        for (std::uint16_t q = 0; q < dev.num_queues(); ++q) vqs.emplace_back(mem);
        std::vector<fake::Driver> rings;
        auto lay_out = [&] {
            rings.clear();
            for (std::uint16_t q = 0; q < dev.num_queues(); ++q) {
                vqs[q].reset();
                vqs[q].set_event_idx((features & virtio_bit(VIRTIO_F_EVENT_IDX)) != 0);
                vqs[q].set_indirect((features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
                rings.emplace_back(mem, kRing, 0x10000 + q * 0x2000ull, kData + q * kDataPerQueue);
                if (!rings.back().configure(vqs[q])) __builtin_trap();
            }
        };
        lay_out();
        dev.activate(vqs, mem);

        for (int step = 0; step < 256 && in.remaining_bytes() > 0; ++step) {
            const auto q = in.ConsumeIntegralInRange<std::uint16_t>(0, dev.num_queues() - 1);
            fake::Driver& ring = rings[q];
            switch (in.ConsumeIntegralInRange<int>(0, 9)) {
            case 0:
            case 1: {   // a request: header, 0..3 data buffers, a status byte (or not)
                const std::vector<std::uint8_t> h = header(in);
                std::vector<fake::Buf> bufs{{ring.alloc_bytes(h.empty() ? std::vector<std::uint8_t>(1) : h),
                                             static_cast<std::uint32_t>(h.size()), in.ConsumeIntegralInRange<int>(0, 15) == 0}};
                const int n = in.ConsumeIntegralInRange<int>(0, 3);
                for (int i = 0; i < n; ++i) {
                    const auto len = in.ConsumeBool() ? 512 * in.ConsumeIntegralInRange<std::uint32_t>(0, 8)
                                                      : in.ConsumeIntegralInRange<std::uint32_t>(0, 4096);
                    bufs.push_back({ring.alloc(len == 0 ? 1 : len, 0xcc), len, in.ConsumeBool()});
                }
                if (in.ConsumeIntegralInRange<int>(0, 7) != 0) bufs.push_back({ring.alloc(1, 0xee), 1, true});
                if (in.ConsumeBool() && (features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0)
                    ring.add_indirect(bufs, ring.alloc(static_cast<std::uint32_t>(16 * bufs.size())));
                else
                    ring.add_chain(bufs);
                break;
            }
            case 2: {   // a raw descriptor, maybe published as a head
                const auto i = in.ConsumeIntegralInRange<std::uint16_t>(0, kRing - 1);
                const std::uint64_t a = in.ConsumeBool() ? in.ConsumeIntegralInRange<std::uint64_t>(0, kRam)
                                                         : in.ConsumeIntegral<std::uint64_t>();
                ring.set_desc(i, a, in.ConsumeIntegral<std::uint32_t>(), in.ConsumeIntegral<std::uint16_t>(),
                              in.ConsumeIntegral<std::uint16_t>());
                if (in.ConsumeBool()) ring.publish(i);
                break;
            }
            case 3:
            case 4:
            case 5:
                dev.queue_notify(q);
                if (!dev.settle()) __builtin_trap();
                break;
            case 6: {   // the driver takes what the device used
                std::uint32_t id = 0, len = 0;
                while (ring.take_used(id, len)) {
                }
                break;
            }
            case 7: {   // configuration space, any offset and size
                std::array<std::uint8_t, 16> b{};
                b[0] = in.ConsumeIntegral<std::uint8_t>();
                const auto off = in.ConsumeIntegralInRange<std::uint64_t>(0, sizeof(VirtioBlkConfig) - 1);
                const auto n = in.ConsumeIntegralInRange<std::size_t>(1, std::min<std::size_t>(16, sizeof(VirtioBlkConfig) - off));
                if (in.ConsumeBool()) dev.read_config(off, std::span<std::uint8_t>(b.data(), n));
                else dev.write_config(off, std::span<const std::uint8_t>(b.data(), n));
                break;
            }
            case 8:   // the host side, as the API thread calls it
                (void)dev.counters();
                (void)dev.writeback();
                break;
            default:   // device reset, then the driver sets everything up again
                dev.reset();
                lay_out();
                dev.activate(vqs, mem);
                break;
            }
        }
        dev.reset();
    }
    if (img.size() != kImage) __builtin_trap();
    if (cfg.readonly && img.contents() != before) __builtin_trap();
    return 0;
}
