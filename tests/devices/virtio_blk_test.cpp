// virtio-blk device model (VIRTIO 1.2 section 5.2) without KVM or a
// transport: the test activates the device with Virtqueues over rings the
// fake driver (support/fake_virtio.hpp) lays out in a real GuestMemory, on a
// temporary raw image. It checks the configuration and features, IN/OUT
// round trips (the file really changes), FLUSH, GET_ID, DISCARD and
// WRITE_ZEROES, every status 5.2.6 asks for (UNSUPP, IOERR on a read-only
// disk, beyond capacity, overflowing sectors; the file never grows), chains
// that cannot carry a status (DEVICE_NEEDS_RESET for that queue only, the
// other queue serving on), many requests in flight, reset under I/O, and a
// fixed-seed loop of random request chains.
#include "devices/virtio_blk.hpp"

#include "devices/base/error.hpp"
#include "tests/support/fake_virtio.hpp"

#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <random>
#include <sys/stat.h>
#include <unistd.h>

namespace kguest {
namespace {

using fake::Buf;
using fake::wait_until;

constexpr std::uint64_t kBase = virtio_bit(VIRTIO_F_VERSION_1);
constexpr std::uint64_t kAllFeatures =
    virtio_bit(VIRTIO_BLK_F_FLUSH) | virtio_bit(VIRTIO_BLK_F_CONFIG_WCE) | virtio_bit(VIRTIO_F_EVENT_IDX) |
    virtio_bit(VIRTIO_F_INDIRECT_DESC) | virtio_bit(VIRTIO_BLK_F_DISCARD) | virtio_bit(VIRTIO_BLK_F_WRITE_ZEROES) |
    virtio_bit(VIRTIO_BLK_F_MQ);

std::vector<std::uint8_t> pattern(std::size_t len, std::uint8_t seed) {
    std::vector<std::uint8_t> v(len);
    for (std::size_t i = 0; i < len; ++i) v[i] = static_cast<std::uint8_t>(seed + i * 13 + (i >> 9));
    return v;
}

// A temporary file that goes away with the test.
struct TempImage {
    std::string path;
    explicit TempImage(std::uint64_t size, std::uint8_t fill = 0) {
        char tmpl[] = "/tmp/kguest-blk-test-XXXXXX";
        const int fd = ::mkstemp(tmpl);
        EXPECT_GE(fd, 0);
        path = tmpl;
        std::vector<std::uint8_t> v(size, fill);
        EXPECT_EQ(::pwrite(fd, v.data(), v.size(), 0), static_cast<ssize_t>(size));
        ::close(fd);
    }
    ~TempImage() { ::unlink(path.c_str()); }
    std::uint64_t size() const {
        struct stat st {};
        ::stat(path.c_str(), &st);
        return static_cast<std::uint64_t>(st.st_size);
    }
    std::vector<std::uint8_t> read(std::uint64_t off, std::size_t len) const {
        std::vector<std::uint8_t> v(len);
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        EXPECT_EQ(::pread(fd, v.data(), len, static_cast<off_t>(off)), static_cast<ssize_t>(len));
        ::close(fd);
        return v;
    }
};

struct Done {
    std::uint8_t status = 0xee;
    std::uint32_t len = 0;
    std::uint64_t data = 0;   // where IN data landed
};

class VirtioBlkTest : public ::testing::Test {
protected:
    GuestMemory mem{32 << 20, Backing::off};
    fake::Transport tr;
    std::vector<Virtqueue> queues;
    std::vector<std::unique_ptr<fake::Driver>> drv;
    std::unique_ptr<TempImage> img;
    std::unique_ptr<VirtioBlk> dev;   // destroyed before the image

    static constexpr std::uint16_t kSize = 128;

    void TearDown() override { dev.reset(); }

    void create(std::uint64_t size = 1 << 20, DiskConfig cfg = {}, std::uint8_t fill = 0) {
        img = std::make_unique<TempImage>(size, fill);
        cfg.path = img->path;
        dev = std::make_unique<VirtioBlk>(std::make_unique<BlockImage>(cfg), cfg.queues, cfg.discard);
        dev->attach(&tr);
    }

    void activate(std::uint64_t features = kAllFeatures, std::uint16_t size = kSize) {
        const std::uint16_t n = dev->num_queues();
        queues.clear();
        queues.reserve(n);
        drv.clear();
        features &= dev->device_features();
        for (std::uint16_t q = 0; q < n; ++q) {
            queues.emplace_back(mem);
            drv.push_back(std::make_unique<fake::Driver>(mem, size, 0x10000ull * (q + 1), 0x200000ull + 0x800000ull * q));
            queues[q].set_event_idx((features & virtio_bit(VIRTIO_F_EVENT_IDX)) != 0);
            queues[q].set_indirect((features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
            ASSERT_TRUE(drv[q]->configure(queues[q])) << queues[q].error().reason;
        }
        tr.features = features | kBase;
        dev->activate(queues, mem);
    }

    std::uint64_t header(std::uint32_t type, std::uint64_t sector, fake::Driver& d) {
        VirtioBlkReqHdr h{type, 0, sector};
        const std::uint64_t a = d.alloc(sizeof h);
        EXPECT_TRUE(mem.write_obj(Gpa(a), h));
        return a;
    }

    // Publishes header, data and status as separate descriptors; returns the
    // status byte's address (and the data's in *data).
    std::uint64_t post(std::uint16_t q, std::uint32_t type, std::uint64_t sector, const std::vector<std::uint8_t>& out,
                       std::uint32_t in_len, std::uint64_t* data = nullptr) {
        fake::Driver& d = *drv[q];
        std::vector<Buf> bufs{{header(type, sector, d), 16, false}};
        if (!out.empty()) bufs.push_back({d.alloc_bytes(out), static_cast<std::uint32_t>(out.size()), false});
        std::uint64_t in = 0;
        if (in_len != 0) {
            in = d.alloc(in_len, 0xcc);
            bufs.push_back({in, in_len, true});
        }
        const std::uint64_t status = d.alloc(1, 0xee);
        bufs.push_back({status, 1, true});
        d.add_chain(bufs);
        if (data != nullptr) *data = in;
        return status;
    }

    // Waits for the next used element of queue q.
    bool take(std::uint16_t q, std::uint32_t& id, std::uint32_t& len) {
        return wait_until([&] { return drv[q]->take_used(id, len); });
    }

    Done request(std::uint16_t q, std::uint32_t type, std::uint64_t sector, const std::vector<std::uint8_t>& out = {},
                 std::uint32_t in_len = 0) {
        Done r;
        const std::uint64_t st = post(q, type, sector, out, in_len, &r.data);
        dev->queue_notify(q);
        std::uint32_t id = 0;
        EXPECT_TRUE(take(q, id, r.len)) << "no used element";
        r.status = *mem.read_obj<std::uint8_t>(Gpa(st));
        return r;
    }

    std::vector<std::uint8_t> read_mem(std::uint64_t gpa, std::size_t len) {
        std::vector<std::uint8_t> v(len);
        EXPECT_TRUE(mem.read(Gpa(gpa), v.data(), len));
        return v;
    }

    VirtioBlkConfig config() {
        VirtioBlkConfig c{};
        dev->read_config(0, std::span(reinterpret_cast<std::uint8_t*>(&c), sizeof c));
        return c;
    }

    Done discard(std::uint32_t type, std::vector<VirtioBlkDiscardSeg> segs) {
        std::vector<std::uint8_t> out(segs.size() * 16);
        std::memcpy(out.data(), segs.data(), out.size());
        return request(0, type, 0, out);
    }
};

TEST_F(VirtioBlkTest, IdentityConfigAndFeatures) {
    create(3 << 20, {.path = {}, .readonly = false, .serial = {}, .cache = DiskConfig::Cache::writeback, .queues = 2,
                     .discard = true, .id = {}});
    EXPECT_EQ(dev->device_id(), 2);
    EXPECT_EQ(dev->num_queues(), 2);
    EXPECT_EQ(dev->max_queue_size(1), 256);
    EXPECT_EQ(dev->max_queue_size(2), 0);
    const std::uint64_t f = dev->device_features();
    for (unsigned bit : {VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH,
                         VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
                         VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC})
        EXPECT_TRUE(f & virtio_bit(bit)) << bit;
    EXPECT_FALSE(f & virtio_bit(VIRTIO_BLK_F_RO));
    EXPECT_EQ(dev->config_size(), 72u);
    VirtioBlkConfig c = config();
    EXPECT_EQ(c.capacity, 6144u);
    EXPECT_EQ(c.blk_size, 512u);
    EXPECT_EQ(c.seg_max, VirtioBlk::kSegMax);
    EXPECT_EQ(c.size_max, VirtioBlk::kSizeMax);
    EXPECT_EQ(c.num_queues, 2);
    EXPECT_EQ(c.writeback, 1);
    EXPECT_EQ(c.max_discard_seg, VirtioBlk::kMaxDiscardSeg);
    EXPECT_EQ(c.discard_sector_alignment, 1u);
    EXPECT_EQ(c.max_write_zeroes_sectors, VirtioBlk::kMaxDiscardSectors);
    EXPECT_EQ(c.write_zeroes_may_unmap, 1);
    // Out of range reads all-ones; a partial read of capacity works.
    std::uint8_t b[4];
    dev->read_config(70, b);
    EXPECT_EQ(b[3], 0xff);
    std::uint32_t lo = 0;
    dev->read_config(0, std::span(reinterpret_cast<std::uint8_t*>(&lo), 4));
    EXPECT_EQ(lo, 6144u);

    // 5.2.5: writeback is writable only once CONFIG_WCE is negotiated.
    const std::uint8_t zero = 0;
    dev->write_config(offsetof(VirtioBlkConfig, writeback), std::span(&zero, 1));
    EXPECT_EQ(config().writeback, 1);
    activate();
    dev->write_config(offsetof(VirtioBlkConfig, writeback), std::span(&zero, 1));
    EXPECT_EQ(config().writeback, 0);
    EXPECT_FALSE(dev->writeback());
    // Writes in writethrough mode work (RWF_DSYNC) and reach the file.
    const auto data = pattern(4096, 3);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_OUT, 8, data).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(4096, 4096), data);
    dev->write_config(0, std::span(&zero, 1));   // capacity: read-only, ignored
    EXPECT_EQ(config().capacity, 6144u);
    dev->reset();
    EXPECT_EQ(config().writeback, 1);   // back to the default
}

TEST_F(VirtioBlkTest, ReadOnlyAndDiscardOffWithoutTheOptions) {
    create(1 << 20, {.path = {}, .readonly = true, .serial = {}, .cache = DiskConfig::Cache::writeback, .queues = 1,
                     .discard = true, .id = {}});
    const std::uint64_t f = dev->device_features();
    EXPECT_TRUE(f & virtio_bit(VIRTIO_BLK_F_RO));
    EXPECT_FALSE(f & virtio_bit(VIRTIO_BLK_F_MQ));
    EXPECT_FALSE(f & virtio_bit(VIRTIO_BLK_F_DISCARD));   // nothing to discard on a read-only disk
    activate();
    // 5.2.6.2: a write to a read-only device is IOERR; reads and flushes work.
    const Done w = request(0, VIRTIO_BLK_T_OUT, 0, pattern(512, 1));
    EXPECT_EQ(w.status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(w.len, 1u);
    EXPECT_EQ(img->read(0, 512), std::vector<std::uint8_t>(512, 0));
    EXPECT_EQ(request(0, VIRTIO_BLK_T_IN, 0, {}, 512).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, 1, 0}}).status, VIRTIO_BLK_S_UNSUPP);
    EXPECT_EQ(dev->counters().errors, 2u);
}

TEST_F(VirtioBlkTest, WriteThenReadRoundTripsThroughTheFile) {
    create(1 << 20);
    activate();
    // A write of three segments, the header split over two descriptors.
    fake::Driver& d = *drv[0];
    const auto data = pattern(3 * 4096, 7);
    VirtioBlkReqHdr h{VIRTIO_BLK_T_OUT, 0, 16};
    const std::uint64_t ha = d.alloc(16);
    ASSERT_TRUE(mem.write_obj(Gpa(ha), h));
    const std::uint64_t a = d.alloc_bytes(std::vector(data.begin(), data.begin() + 4096));
    const std::uint64_t b = d.alloc_bytes(std::vector(data.begin() + 4096, data.end()));
    const std::uint64_t st = d.alloc(1, 0xee);
    d.add_chain({{ha, 8}, {ha + 8, 8}, {a, 4096}, {b, 8192}, {st, 1, true}});
    dev->queue_notify(0);
    std::uint32_t id, len;
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(len, 1u);   // only the status byte went into guest memory
    EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(st)), VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(16 * 512, data.size()), data);

    // Read it back into two writable buffers with the status in the second.
    const std::uint64_t ra = d.alloc(5000, 0xcc), rb = d.alloc(3 * 4096 - 5000 + 1, 0xcc);
    const std::uint64_t rh = header(VIRTIO_BLK_T_IN, 16, d);
    d.add_chain({{rh, 16}, {ra, 5000, true}, {rb, 3 * 4096 - 5000 + 1, true}});
    dev->queue_notify(0);
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(len, 3 * 4096 + 1u);   // data and status
    auto got = read_mem(ra, 5000);
    auto rest = read_mem(rb, 3 * 4096 - 5000);
    got.insert(got.end(), rest.begin(), rest.end());
    EXPECT_EQ(got, data);
    EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(rb + 3 * 4096 - 5000)), VIRTIO_BLK_S_OK);

    // The last sector of the disk.
    const auto tail = pattern(512, 99);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_OUT, 2047, tail).status, VIRTIO_BLK_S_OK);
    const Done r = request(0, VIRTIO_BLK_T_IN, 2047, {}, 512);
    EXPECT_EQ(r.status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(read_mem(r.data, 512), tail);

    const BlkCounters c = dev->counters();
    EXPECT_EQ(c.writes, 2u);
    EXPECT_EQ(c.write_bytes, 3 * 4096 + 512u);
    EXPECT_EQ(c.reads, 2u);
    EXPECT_EQ(c.read_bytes, 3 * 4096 + 512u);
    EXPECT_EQ(c.errors, 0u);
    EXPECT_EQ(img->size(), 1u << 20);
}

TEST_F(VirtioBlkTest, IndirectRequest) {
    create(1 << 20, {}, 0x5a);
    activate();
    fake::Driver& d = *drv[0];
    const std::uint64_t h = header(VIRTIO_BLK_T_IN, 1, d), buf = d.alloc(1024, 0), st = d.alloc(1, 0xee);
    d.add_indirect({{h, 16}, {buf, 1024, true}, {st, 1, true}}, d.alloc(64));
    dev->queue_notify(0);
    std::uint32_t id, len;
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(len, 1025u);
    EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(st)), VIRTIO_BLK_S_OK);
    EXPECT_EQ(read_mem(buf, 1024), std::vector<std::uint8_t>(1024, 0x5a));
}

TEST_F(VirtioBlkTest, FlushGetIdAndUnknownTypes) {
    DiskConfig cfg;
    cfg.serial = "kguest-disk-0";
    create(1 << 20, cfg);
    activate();
    EXPECT_EQ(request(0, VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(dev->counters().flushes, 1u);
    Done id = request(0, VIRTIO_BLK_T_GET_ID, 0, {}, 20);
    EXPECT_EQ(id.status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(id.len, 21u);
    std::vector<std::uint8_t> want(20, 0);
    std::memcpy(want.data(), "kguest-disk-0", 13);
    EXPECT_EQ(read_mem(id.data, 20), want);
    // A short buffer gets what fits.
    id = request(0, VIRTIO_BLK_T_GET_ID, 0, {}, 6);
    EXPECT_EQ(id.len, 7u);
    EXPECT_EQ(read_mem(id.data, 6), std::vector<std::uint8_t>(want.begin(), want.begin() + 6));
    // 5.2.6.1: unknown types (and GET_LIFETIME, SECURE_ERASE) are UNSUPP.
    for (std::uint32_t type : {2u, 3u, 10u, 14u, 0xffffffffu}) {
        const Done r = request(0, type, 0, pattern(512, 1), 512);
        EXPECT_EQ(r.status, VIRTIO_BLK_S_UNSUPP) << type;
        EXPECT_EQ(r.len, 1u);
    }
    // Without DISCARD/WRITE_ZEROES offered: UNSUPP.
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, 8, 0}}).status, VIRTIO_BLK_S_UNSUPP);
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{0, 8, 0}}).status, VIRTIO_BLK_S_UNSUPP);
}

TEST_F(VirtioBlkTest, DefaultSerialIsThePathsTail) {
    create(1 << 20);
    activate();
    const Done id = request(0, VIRTIO_BLK_T_GET_ID, 0, {}, 20);
    const std::string want = img->path.substr(img->path.size() - 20);
    EXPECT_EQ(read_mem(id.data, 20), std::vector<std::uint8_t>(want.begin(), want.end()));
}

TEST_F(VirtioBlkTest, RequestsOutsideTheDiskAreIoErrAndTheFileNeverGrows) {
    create(1 << 20);   // 2048 sectors
    activate();
    struct Case {
        std::uint32_t type;
        std::uint64_t sector;
        std::uint32_t len;
    } cases[] = {
        {VIRTIO_BLK_T_OUT, 2048, 512},                 // just past the end
        {VIRTIO_BLK_T_OUT, 2047, 1024},                // straddles the end
        {VIRTIO_BLK_T_IN, 2048, 512},
        {VIRTIO_BLK_T_OUT, ~0ull, 512},                // sector * 512 overflows
        {VIRTIO_BLK_T_IN, ~0ull / 512 + 1, 512},       // exactly 2^64 bytes
        {VIRTIO_BLK_T_OUT, (1ull << 55), 512},
        {VIRTIO_BLK_T_OUT, 0, 0},                      // no data
        {VIRTIO_BLK_T_IN, 0, 0},
        {VIRTIO_BLK_T_OUT, 0, 100},                    // 5.2.6.1: a multiple of 512
        {VIRTIO_BLK_T_IN, 0, 513},
    };
    for (const Case& c : cases) {
        const Done r = c.type == VIRTIO_BLK_T_OUT ? request(0, c.type, c.sector, pattern(c.len, 1))
                                                  : request(0, c.type, c.sector, {}, c.len);
        EXPECT_EQ(r.status, VIRTIO_BLK_S_IOERR) << c.type << " " << c.sector << " " << c.len;
        EXPECT_EQ(r.len, 1u);
    }
    EXPECT_EQ(img->size(), 1u << 20);
    EXPECT_EQ(img->read(0, 512), std::vector<std::uint8_t>(512, 0));
    EXPECT_EQ(dev->counters().errors, std::size(cases));
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioBlkTest, DiscardAndWriteZeroes) {
    DiskConfig cfg;
    cfg.discard = true;
    create(1 << 20, cfg, 0x77);
    activate();
    // DISCARD punches: the range reads as zeroes, the size stays.
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{8, 8, 0}, {64, 16, 0}}).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(8 * 512, 4096), std::vector<std::uint8_t>(4096, 0));
    EXPECT_EQ(img->read(64 * 512, 8192), std::vector<std::uint8_t>(8192, 0));
    EXPECT_EQ(img->read(0, 4096), std::vector<std::uint8_t>(4096, 0x77));
    // WRITE_ZEROES, with and without UNMAP.
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{200, 3, 0}}).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(200 * 512, 1536), std::vector<std::uint8_t>(1536, 0));
    EXPECT_EQ(img->read(203 * 512, 512), std::vector<std::uint8_t>(512, 0x77));
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{300, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP}}).status,
              VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(300 * 512, 4096), std::vector<std::uint8_t>(4096, 0));
    // The last sectors, then one past.
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{2040, 8, 0}}).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{2041, 8, 0}}).status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(img->size(), 1u << 20);

    // 5.2.6.2: UNSUPP for DISCARD with the unmap flag or an unknown flag,
    // for WRITE_ZEROES with an unknown flag.
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP}}).status, VIRTIO_BLK_S_UNSUPP);
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, 8, 4}}).status, VIRTIO_BLK_S_UNSUPP);
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{0, 8, 2}}).status, VIRTIO_BLK_S_UNSUPP);
    // Ranges that overflow or exceed the advertised limits: IOERR, nothing done.
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{~0ull - 3, 8, 0}}).status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, 0, 0}}).status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{0, VirtioBlk::kMaxDiscardSectors + 1, 0}}).status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{0, 0xffffffffu, 0}}).status, VIRTIO_BLK_S_IOERR);
    std::vector<VirtioBlkDiscardSeg> many(VirtioBlk::kMaxDiscardSeg + 1, VirtioBlkDiscardSeg{0, 1, 0});
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, many).status, VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_DISCARD, 0, pattern(24, 0)).status, VIRTIO_BLK_S_IOERR);   // not 16-byte segments
    EXPECT_EQ(request(0, VIRTIO_BLK_T_DISCARD, 0).status, VIRTIO_BLK_S_IOERR);                   // no segment
    EXPECT_EQ(img->read(0, 4096), std::vector<std::uint8_t>(4096, 0x77));
    EXPECT_EQ(dev->counters().discards, 4u);
    EXPECT_EQ(img->size(), 1u << 20);
}

// cache=none: O_DIRECT, blk_size the alignment the file system wants;
// aligned requests reach the file, a misaligned guest buffer is an IOERR.
TEST_F(VirtioBlkTest, CacheNoneGoesDirect) {
    DiskConfig cfg;
    cfg.cache = DiskConfig::Cache::none;
    create(1 << 20, cfg);
    ASSERT_TRUE(dev->image().direct());
    const std::uint32_t bs = dev->image().block_size();
    EXPECT_TRUE(bs == 512 || bs == 1024 || bs == 2048 || bs == 4096) << bs;
    EXPECT_EQ(config().blk_size, bs);
    EXPECT_NE(::fcntl(dev->image().fd(), F_GETFL) & O_DIRECT, 0);
    activate();
    fake::Driver& d = *drv[0];
    const auto data = pattern(8192, 21);
    const std::uint64_t out = 0x1800000, in = 0x1900000;   // 4 KiB-aligned guest buffers
    ASSERT_TRUE(mem.write(Gpa(out), data.data(), data.size()));
    std::uint64_t st = d.alloc(1, 0xee);
    d.add_chain({{header(VIRTIO_BLK_T_OUT, 8, d), 16}, {out, 8192}, {st, 1, true}});
    dev->queue_notify(0);
    std::uint32_t id, len;
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(st)), VIRTIO_BLK_S_OK);
    EXPECT_EQ(img->read(4096, 8192), data);
    st = d.alloc(1, 0xee);
    d.add_chain({{header(VIRTIO_BLK_T_IN, 8, d), 16}, {in, 8192, true}, {st, 1, true}});
    dev->queue_notify(0);
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(len, 8193u);
    EXPECT_EQ(read_mem(in, 8192), data);
    // A buffer one byte off: the kernel refuses it, the guest gets IOERR.
    st = d.alloc(1, 0xee);
    d.add_chain({{header(VIRTIO_BLK_T_IN, 8, d), 16}, {in + 1, 4096, true}, {st, 1, true}});
    dev->queue_notify(0);
    ASSERT_TRUE(take(0, id, len));
    EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(st)), VIRTIO_BLK_S_IOERR);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK);
}

// tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: WRITE_ZEROES punches instead.
TEST_F(VirtioBlkTest, WriteZeroesPunchesWhereZeroRangeIsMissing) {
    char tmpl[] = "/dev/shm/kguest-blk-test-XXXXXX";
    const int fd = ::mkstemp(tmpl);
    if (fd < 0) GTEST_SKIP() << "no /dev/shm";
    const std::string path = tmpl;
    std::vector<std::uint8_t> fill(1 << 20, 0x66);
    ASSERT_EQ(::pwrite(fd, fill.data(), fill.size(), 0), static_cast<ssize_t>(fill.size()));
    DiskConfig cfg;
    cfg.path = path;
    cfg.discard = true;
    dev = std::make_unique<VirtioBlk>(std::make_unique<BlockImage>(cfg), 1, true);
    dev->attach(&tr);
    activate();
    EXPECT_EQ(discard(VIRTIO_BLK_T_WRITE_ZEROES, {{16, 8, 0}}).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(discard(VIRTIO_BLK_T_DISCARD, {{64, 8, 0}}).status, VIRTIO_BLK_S_OK);
    std::vector<std::uint8_t> got(4096);
    ASSERT_EQ(::pread(fd, got.data(), 4096, 16 * 512), 4096);
    EXPECT_EQ(got, std::vector<std::uint8_t>(4096, 0));
    ASSERT_EQ(::pread(fd, got.data(), 4096, 64 * 512), 4096);
    EXPECT_EQ(got, std::vector<std::uint8_t>(4096, 0));
    ASSERT_EQ(::pread(fd, got.data(), 4096, 0), 4096);
    EXPECT_EQ(got, std::vector<std::uint8_t>(4096, 0x66));
    dev.reset();
    ::close(fd);
    ::unlink(path.c_str());
}

TEST_F(VirtioBlkTest, ChainsWithoutHeaderOrStatusBreakOnlyTheirQueue) {
    DiskConfig cfg;
    cfg.queues = 2;
    for (int shape = 0; shape < 4; ++shape) {
        dev.reset();
        tr.needs_reset_calls = 0;
        create(1 << 20, cfg);
        activate();
        fake::Driver& d = *drv[0];
        const std::uint64_t h = header(VIRTIO_BLK_T_IN, 0, d), buf = d.alloc(512);
        switch (shape) {
        case 0: d.add_chain({{h, 16, true}, {buf, 512, true}}); break;      // header device-writable
        case 1: d.add_chain({{h, 16}, {buf, 513}}); break;                  // no writable status byte
        case 2: d.add_chain({{h, 16}}); break;                              // a chain of one descriptor
        case 3: d.add_chain({{h, 8}, {buf, 512, true}}); break;             // header too short
        }
        dev->queue_notify(0);
        ASSERT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == 1; })) << shape;
        // The other queue keeps serving.
        EXPECT_EQ(request(1, VIRTIO_BLK_T_OUT, 4, pattern(512, 5)).status, VIRTIO_BLK_S_OK) << shape;
        // The broken queue stays quiet until reset.
        d.add_chain({{header(VIRTIO_BLK_T_FLUSH, 0, d), 16}, {d.alloc(1), 1, true}});
        dev->queue_notify(0);
        ASSERT_TRUE(dev->settle());
        EXPECT_EQ(d.used_idx(), 0) << shape;
        // After a reset the device works again.
        dev->reset();
        activate();
        EXPECT_EQ(request(0, VIRTIO_BLK_T_FLUSH, 0).status, VIRTIO_BLK_S_OK) << shape;
    }
}

TEST_F(VirtioBlkTest, ManyRequestsInFlightAndOneInterruptPerBatch) {
    create(4 << 20);
    activate(kAllFeatures & ~virtio_bit(VIRTIO_F_EVENT_IDX), 256);
    fake::Driver& d = *drv[0];
    constexpr int kN = 80;
    std::vector<std::uint64_t> st(kN), bufs(kN);
    for (int i = 0; i < kN; ++i) {
        const auto data = pattern(4096, static_cast<std::uint8_t>(i));
        ASSERT_EQ(::pwrite(dev->image().fd(), data.data(), 4096, i * 4096), 4096);
    }
    for (int i = 0; i < kN; ++i) {
        bufs[i] = d.alloc(4096);
        st[i] = d.alloc(1, 0xee);
        d.add_chain({{header(VIRTIO_BLK_T_IN, 8ull * i, d), 16}, {bufs[i], 4096, true}, {st[i], 1, true}});
    }
    dev->queue_notify(0);
    ASSERT_TRUE(wait_until([&] { return d.used_idx() == kN; }));
    for (int i = 0; i < kN; ++i) {
        EXPECT_EQ(*mem.read_obj<std::uint8_t>(Gpa(st[i])), VIRTIO_BLK_S_OK);
        EXPECT_EQ(read_mem(bufs[i], 4096), pattern(4096, static_cast<std::uint8_t>(i))) << i;
    }
    // Every used element says 4097 bytes.
    for (int i = 0; i < kN; ++i) EXPECT_EQ(d.used_elem(static_cast<std::uint16_t>(i)).second, 4097u);
    // Interrupts go out per batch of completions, not per request.
    EXPECT_GE(tr.interrupts(0), 1);
    EXPECT_LE(tr.interrupts(0), kN);
}

TEST_F(VirtioBlkTest, ResetWaitsForInFlightIoAndNothingIsPublishedAfter) {
    create(8 << 20);
    for (int round = 0; round < 5; ++round) {
        activate(kAllFeatures, 256);
        fake::Driver& d = *drv[0];
        for (int i = 0; i < 60; ++i)
            d.add_chain({{header(i % 2 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT, 16ull * i, d), 16},
                         {d.alloc(8192), 8192, i % 2 == 1},
                         {d.alloc(1), 1, true}});
        dev->queue_notify(0);
        dev->reset();
        const std::uint16_t used = d.used_idx();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        EXPECT_EQ(d.used_idx(), used) << "a request completed into the rings after reset";
        EXPECT_LE(used, 60);
    }
}

// Random request chains, seeded: whatever the guest sends, the device
// neither crashes nor writes outside the chain, and each used element is
// sane: a status in {OK, IOERR, UNSUPP} and a length no larger than the
// writable part.
TEST_F(VirtioBlkTest, RandomRequestChains) {
    DiskConfig cfg;
    cfg.discard = true;
    create(256 << 10, cfg);
    activate(kAllFeatures, 64);
    std::mt19937 rng(20261205);
    auto pick = [&](std::uint32_t n) { return static_cast<std::uint32_t>(rng() % n); };
    const std::uint32_t types[] = {VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                   VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 3, 0x80000000u};
    const std::uint64_t scratch = 0x1000000;   // 4 MiB of buffers, reused every round
    int resets = 0, answered = 0;
    for (int round = 0; round < 400; ++round) {
        fake::Driver& d = *drv[0];
        const std::uint64_t hdr = scratch + 64ull * pick(64);
        VirtioBlkReqHdr h{types[pick(8)], pick(2) ? 0u : static_cast<std::uint32_t>(rng()),
                          pick(4) == 0 ? (std::uint64_t{rng()} << 32 | rng()) : pick(600)};
        ASSERT_TRUE(mem.write_obj(Gpa(hdr), h));
        if (h.type == VIRTIO_BLK_T_DISCARD || h.type == VIRTIO_BLK_T_WRITE_ZEROES) {
            VirtioBlkDiscardSeg g{pick(600), pick(3) ? pick(64) : static_cast<std::uint32_t>(rng()), pick(4) ? 0 : pick(8)};
            ASSERT_TRUE(mem.write_obj(Gpa(hdr + 16), g));
        }
        std::vector<Buf> bufs;
        const std::uint32_t n = 1 + pick(5);
        bool writable = false;
        std::uint64_t wlen = 0;
        for (std::uint32_t i = 0; i < n; ++i) {
            if (i == 0) {
                bufs.push_back({hdr, pick(6) == 0 ? pick(40) : 16 + 16 * pick(2), pick(10) == 0});
            } else {
                writable = writable || pick(2) == 0;
                const std::uint32_t len = pick(3) == 0 ? 1 : 512 * pick(9) + (pick(5) == 0 ? pick(512) : 0);
                bufs.push_back({scratch + 0x10000ull + 0x20000ull * pick(24), len, writable});
            }
            if (bufs.back().write) wlen += bufs.back().len;
        }
        d.add_chain(bufs);
        dev->queue_notify(0);
        std::uint32_t id = 0, len = 0;
        bool used = false;
        ASSERT_TRUE(wait_until([&] { return (used = d.take_used(id, len)) || tr.needs_reset_calls.load() != 0; }))
            << round;
        if (used) {
            ++answered;
            EXPECT_LE(len, wlen) << round;
            EXPECT_GE(len, 1u) << round;
            const Buf* last = nullptr;   // the status: the last writable byte
            for (const Buf& b : bufs)
                if (b.write && b.len != 0) last = &b;
            ASSERT_NE(last, nullptr) << round;
            EXPECT_LE(*mem.read_obj<std::uint8_t>(Gpa(last->addr + last->len - 1)), VIRTIO_BLK_S_UNSUPP) << round;
        } else {
            // No answer: the chain could not carry a status; the device asked for a reset.
            ASSERT_GE(tr.needs_reset_calls.load(), 1) << round;
            tr.needs_reset_calls = 0;
            dev->reset();
            activate(kAllFeatures, 64);
            ++resets;
        }
    }
    EXPECT_GT(answered, 100);
    EXPECT_GT(resets, 5);
    EXPECT_EQ(img->size(), 256u << 10);
    // Still alive and correct after all that.
    if (tr.needs_reset_calls.load() != 0) {
        dev->reset();
        activate();
    }
    const auto data = pattern(512, 42);
    EXPECT_EQ(request(0, VIRTIO_BLK_T_OUT, 3, data).status, VIRTIO_BLK_S_OK);
    EXPECT_EQ(read_mem(request(0, VIRTIO_BLK_T_IN, 3, {}, 512).data, 512), data);
}

} // namespace
} // namespace kguest
