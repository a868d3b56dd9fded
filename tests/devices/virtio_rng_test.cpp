// virtio-rng (VIRTIO 1.2 section 5.4) without KVM, on its event loop: a 16
// MiB guest and the fake driver (support/fake_virtio.hpp) posting writable
// buffers on the requestq as Linux's virtio-rng does. Covers the bytes coming
// from the source in order, /dev/urandom, the rate limit's bucket, hostile
// chains (DEVICE_NEEDS_RESET), Bus Master Enable, a source with nothing to
// give (a reset and the destructor still return) and a source at EOF.
#include "devices/virtio_rng.hpp"

#include "tests/support/fake_virtio.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <optional>
#include <string>
#include <unistd.h>
#include <vector>

namespace kguest {
namespace {

constexpr std::uint64_t MiB = 1ull << 20;

Fd open_or_die(const char* path) {
    const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    EXPECT_GE(fd, 0) << path;
    return Fd(fd);
}

// A temporary file holding `bytes`, opened for reading (unlinked at once).
Fd file_with(const std::vector<std::uint8_t>& bytes) {
    char path[] = "/tmp/kguest-rng-test-XXXXXX";
    const int fd = ::mkstemp(path);
    EXPECT_GE(fd, 0);
    ::unlink(path);
    EXPECT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    EXPECT_EQ(::lseek(fd, 0, SEEK_SET), 0);
    return Fd(fd);
}

class Rig {
public:
    GuestMemory mem{16 * MiB, Backing::off};
    fake::Transport tr;
    VirtioRng dev;
    std::vector<Virtqueue> vqs;
    std::optional<fake::Driver> ring;

    explicit Rig(Fd source, RngLimit limit = {}) : dev(std::move(source), limit) {
        dev.attach(&tr);
        tr.features = dev.device_features() | virtio_bit(VIRTIO_F_VERSION_1);
        vqs.emplace_back(mem);
        ring.emplace(mem, 64);
        EXPECT_TRUE(ring->configure(vqs[0])) << vqs[0].error().reason;
        dev.activate(vqs, mem);
    }
    ~Rig() { dev.reset(); }

    // Posts one writable buffer of `len` bytes (filled with 0xee) and kicks.
    std::uint64_t post(std::uint32_t len) {
        const std::uint64_t a = ring->alloc(len, 0xee);
        ring->add_chain({{a, len, true}});
        dev.queue_notify(0);
        return a;
    }
    // Waits for the next used element; {id, len}, or len 0xffffffff when none came.
    std::pair<std::uint32_t, std::uint32_t> used(int ms = 5000) {
        std::uint32_t id = 0, len = 0xffffffff;
        fake::wait_until([&] { return ring->take_used(id, len); }, ms);
        return {id, len};
    }
    std::vector<std::uint8_t> bytes(std::uint64_t gpa, std::uint32_t len) {
        std::vector<std::uint8_t> v(len);
        EXPECT_TRUE(mem.read(Gpa(gpa), v.data(), len));
        return v;
    }
};

TEST(VirtioRng, DescribesAnEntropyDevice) {
    Rig r(open_or_die("/dev/urandom"));
    EXPECT_EQ(r.dev.device_id(), 4);   // 5.4.1
    EXPECT_EQ(r.dev.num_queues(), 1);
    EXPECT_EQ(r.dev.config_size(), 0u);   // 5.4.4: no configuration
    EXPECT_EQ(r.dev.device_features() & ~virtio_bit(VIRTIO_F_INDIRECT_DESC), 0u);   // 5.4.3: no feature bits
}

TEST(VirtioRng, FillsEachBufferWithTheSourcesNextBytes) {
    std::vector<std::uint8_t> src(300);
    for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint8_t>(i * 7 + 1);
    Rig r(file_with(src));
    const std::uint64_t a = r.post(100);
    auto [id, len] = r.used();
    EXPECT_EQ(id, 0u);
    ASSERT_EQ(len, 100u);
    EXPECT_EQ(r.bytes(a, 100), std::vector<std::uint8_t>(src.begin(), src.begin() + 100));
    const std::uint64_t b = r.post(150);
    std::tie(id, len) = r.used();
    ASSERT_EQ(len, 150u);
    EXPECT_EQ(r.bytes(b, 150), std::vector<std::uint8_t>(src.begin() + 100, src.begin() + 250));
    EXPECT_EQ(r.dev.counters().bytes, 250u);
    EXPECT_EQ(r.dev.counters().requests, 2u);
    EXPECT_GE(r.tr.interrupts(0), 1);
    EXPECT_EQ(r.tr.needs_reset_calls, 0);
}

TEST(VirtioRng, ServesUrandomInChainsOfSeveralBuffers) {
    Rig r(open_or_die("/dev/urandom"));
    const std::uint64_t a = r.ring->alloc(1000, 0), b = r.ring->alloc(3096, 0);
    r.ring->add_chain({{a, 1000, true}, {b, 3096, true}});
    r.dev.queue_notify(0);
    auto [id, len] = r.used();
    ASSERT_EQ(len, 4096u);   // 5.4.6.1: MAY use less; /dev/urandom gives all at once
    std::vector<std::uint8_t> all = r.bytes(a, 1000), rest = r.bytes(b, 3096);
    all.insert(all.end(), rest.begin(), rest.end());
    std::size_t distinct[256] = {};
    for (std::uint8_t v : all) ++distinct[v];
    int values = 0;
    for (std::size_t n : distinct) values += n != 0;
    EXPECT_GT(values, 200) << "4096 random bytes take nearly every byte value";
}

TEST(VirtioRng, BucketLimitsTheRate) {
    // 4000 bytes/s from a 1000-byte bucket: 4 buffers of 1000 bytes need the
    // full bucket and then 3000 bytes of refill, 0.75 s at least.
    Rig r(open_or_die("/dev/urandom"), RngLimit{4000, 1000});
    fake::Stopwatch w;
    for (int i = 0; i < 4; ++i) r.post(1000);
    std::uint64_t got = 0;
    for (int i = 0; i < 8 && got < 4000; ++i) {
        auto [id, len] = r.used();
        ASSERT_NE(len, 0xffffffffu) << "after " << got << " bytes";
        EXPECT_LE(len, 1000u);   // never more than the bucket holds
        got += len;
    }
    EXPECT_EQ(got, 4000u);
    EXPECT_GE(w.elapsed().count(), 700);
    EXPECT_GE(r.dev.counters().throttled, 1u);
}

TEST(VirtioRng, ReadableBufferIsABrokenRing) {
    Rig r(open_or_die("/dev/urandom"));
    const std::uint64_t a = r.ring->alloc(16), b = r.ring->alloc(16);
    r.ring->add_chain({{a, 16, false}, {b, 16, true}});   // 5.4.6.2: MUST NOT
    r.dev.queue_notify(0);
    ASSERT_TRUE(fake::wait_until([&] { return r.tr.needs_reset_calls.load() == 1; }));
    EXPECT_EQ(r.dev.counters().bad_chains, 1u);
    // Hands off until reset: a good buffer now gets nothing.
    r.post(16);
    EXPECT_EQ(r.used(200).second, 0xffffffffu);
    EXPECT_EQ(r.dev.counters().bytes, 0u);
}

TEST(VirtioRng, MalformedDescriptorIsABrokenRing) {
    Rig r(open_or_die("/dev/urandom"));
    r.ring->add_chain({{0xffffffff0000ull, 16, true}});   // outside guest RAM
    r.dev.queue_notify(0);
    ASSERT_TRUE(fake::wait_until([&] { return r.tr.needs_reset_calls.load() == 1; }));
    EXPECT_EQ(r.dev.counters().bytes, 0u);
}

TEST(VirtioRng, NothingWhileBusMasteringIsOff) {
    Rig r(open_or_die("/dev/urandom"));
    r.tr.dma = false;
    r.post(32);
    EXPECT_EQ(r.used(200).second, 0xffffffffu);
    r.tr.dma = true;
    r.dev.queue_notify(0);   // the transport kicks every queue when it comes back on
    EXPECT_EQ(r.used().second, 32u);
}

TEST(VirtioRng, EmptyFifoNeverBlocksResetOrTeardown) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    Fd writer(p[1]);
    {
        Rig r{Fd(p[0])};
        r.post(64);
        EXPECT_EQ(r.used(200).second, 0xffffffffu);
        const auto took = fake::Stopwatch::time([&] { r.dev.reset(); });
        EXPECT_LT(took.count(), 1000);
        // Bytes that come after the reset go nowhere: the old ring is gone.
        ASSERT_EQ(::write(writer.get(), "0123456789", 10), 10);
        EXPECT_EQ(r.used(200).second, 0xffffffffu);
    }   // the destructor cancels the read in flight
}

TEST(VirtioRng, SourceAtEndOfFileLeavesTheBufferWaiting) {
    Rig r(file_with({1, 2, 3, 4, 5}));
    r.post(64);
    EXPECT_EQ(r.used().second, 5u);
    r.post(64);
    EXPECT_EQ(r.used(300).second, 0xffffffffu);
    EXPECT_EQ(r.tr.needs_reset_calls, 0);
}

} // namespace
} // namespace kguest
