// Split virtqueue: the fake driver (support/fake_virtio.hpp) lays out the
// rings in a real GuestMemory and plays the guest's side, well-behaved and
// hostile (every malformed-chain case of 2.7.5 / 2.7.4.2), plus a fixed-seed
// fuzz run over random rings.
#include "devices/virtqueue.hpp"

#include "tests/support/fake_virtio.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <gtest/gtest.h>
#include <random>
#include <string>
#include <vector>

namespace kguest {
namespace {

using fake::Buf;
using FakeDriver = fake::Driver;

class VirtqueueTest : public ::testing::Test {
protected:
    GuestMemory mem{4 << 20, Backing::off};
    Virtqueue q{mem};
    FakeDriver drv{mem, 8};
    DescChain chain;

    void SetUp() override { ASSERT_TRUE(drv.configure(q)) << q.error().reason; }
    // Pops expecting an error whose reason contains `what`.
    void expect_error(const std::string& what) {
        EXPECT_EQ(q.pop(chain), PopStatus::error);
        EXPECT_NE(std::string(q.error().reason).find(what), std::string::npos) << q.error().reason;
        EXPECT_TRUE(q.failed());
    }
};
// The malformed-ring cases, in their own suite.
class VirtqueueErrors : public VirtqueueTest {};

TEST(Virtqueue, ConfigureChecksSizeAlignmentAndRam) {
    GuestMemory mem(4 << 20, Backing::off);
    Virtqueue q(mem);
    std::uint64_t end = mem.size();
    EXPECT_FALSE(q.configure(0, 0x1000, 0x2000, 0x3000));
    EXPECT_FALSE(q.configure(3, 0x1000, 0x2000, 0x3000));
    EXPECT_FALSE(q.configure(0xffff, 0x1000, 0x2000, 0x3000));
    EXPECT_NE(std::string(q.error().reason).find("power of 2"), std::string::npos);
    EXPECT_FALSE(q.configure(8, 0x1008, 0x2000, 0x3000));   // desc needs 16
    EXPECT_FALSE(q.configure(8, 0x1000, 0x2001, 0x3000));   // avail needs 2
    EXPECT_FALSE(q.configure(8, 0x1000, 0x2000, 0x3002));   // used needs 4
    EXPECT_NE(std::string(q.error().reason).find("misaligned"), std::string::npos);
    EXPECT_FALSE(q.configure(8, end - 0x70, 0x2000, 0x3000));   // desc needs 0x80
    EXPECT_FALSE(q.configure(8, 0x1000, end - 20, 0x3000));     // avail needs 22
    EXPECT_FALSE(q.configure(8, 0x1000, 0x2000, end - 68));     // used needs 70
    EXPECT_FALSE(q.configure(8, 0x1000, 0x2000, kMmioHoleStart));
    EXPECT_FALSE(q.configure(8, UINT64_MAX - 15, 0x2000, 0x3000));
    EXPECT_NE(std::string(q.error().reason).find("guest RAM"), std::string::npos);
    EXPECT_FALSE(q.ready());
    DescChain c;
    EXPECT_EQ(q.pop(c), PopStatus::empty);   // not ready
    EXPECT_TRUE(q.configure(8, end - 0x80, end - 22, end - 72));   // rings flush with the end
    EXPECT_TRUE(q.ready());
    EXPECT_TRUE(q.configure(kVirtqMaxSize, 0, 0x80000, 0xa0000));
    EXPECT_TRUE(q.configure(1, 0x1000, 0x2000, 0x3000));
}

TEST_F(VirtqueueTest, EmptyQueuePopsEmpty) {
    EXPECT_EQ(q.pop(chain), PopStatus::empty);
    EXPECT_FALSE(q.failed());
}

TEST_F(VirtqueueTest, ReadableThenWritableChain) {
    std::uint64_t hdr = drv.alloc(4, 0xaa), body = drv.alloc(6, 0xbb), resp = drv.alloc(8, 0);
    std::uint16_t head = drv.add_chain({{hdr, 4}, {body, 6}, {resp, 8, true}});
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    EXPECT_EQ(chain.head(), head);
    ASSERT_EQ(chain.elems().size(), 3u);
    EXPECT_EQ(chain.elems()[0].addr.value(), hdr);
    EXPECT_FALSE(chain.elems()[1].write);
    EXPECT_TRUE(chain.elems()[2].write);
    EXPECT_EQ(chain.readable_len(), 10u);
    EXPECT_EQ(chain.writable_len(), 8u);
    std::uint8_t in[10];
    ASSERT_TRUE(chain.read(mem, 0, in, sizeof in));
    EXPECT_EQ(in[3], 0xaa);
    EXPECT_EQ(in[4], 0xbb);
    const std::uint8_t out[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ASSERT_TRUE(chain.write(mem, 0, out, sizeof out));
    EXPECT_EQ(mem.read_obj<std::uint64_t>(Gpa(resp)), 0x0807060504030201u);
    EXPECT_EQ(q.pop(chain), PopStatus::empty);
    ASSERT_TRUE(q.push_used(head, 8));
    EXPECT_EQ(drv.used_idx(), 1);
    EXPECT_EQ(drv.used_elem(0), std::make_pair(std::uint32_t{head}, 8u));
    EXPECT_FALSE(q.push_used(8, 0));   // head out of range
}

TEST_F(VirtqueueTest, ScatterGatherAcrossDescriptors) {
    std::uint64_t r[3] = {drv.alloc(3), drv.alloc(5), drv.alloc(7)};
    std::uint8_t src[15];
    for (int i = 0; i < 15; ++i) src[i] = static_cast<std::uint8_t>(i);
    ASSERT_TRUE(mem.write(Gpa(r[0]), src, 3));
    ASSERT_TRUE(mem.write(Gpa(r[1]), src + 3, 5));
    ASSERT_TRUE(mem.write(Gpa(r[2]), src + 8, 7));
    std::uint64_t w0 = drv.alloc(4 + 2, 0xee), w1 = drv.alloc(5 + 2, 0xee);   // 2 guard bytes each
    drv.add_chain({{r[0], 3}, {r[1], 5}, {r[2], 7}, {w0, 4, true}, {w1, 5, true}});
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;

    std::uint8_t got[15] = {};
    ASSERT_TRUE(chain.read(mem, 2, got, 10));   // spans all three readable buffers
    EXPECT_EQ(0, std::memcmp(got, src + 2, 10));
    ASSERT_TRUE(chain.read(mem, 15, got, 0));
    EXPECT_FALSE(chain.read(mem, 10, got, 6));   // overrun by one
    EXPECT_FALSE(chain.read(mem, 16, got, 0));
    EXPECT_FALSE(chain.read(mem, UINT64_MAX, got, 2));

    const std::uint8_t pat[9] = {9, 8, 7, 6, 5, 4, 3, 2, 1};
    ASSERT_TRUE(chain.write(mem, 1, pat, 7));   // 3 bytes into w0, 4 into w1
    std::uint8_t b0[6], b1[7];
    ASSERT_TRUE(mem.read(Gpa(w0), b0, 6));
    ASSERT_TRUE(mem.read(Gpa(w1), b1, 7));
    const std::uint8_t e0[6] = {0xee, 9, 8, 7, 0xee, 0xee}, e1[7] = {6, 5, 4, 3, 0xee, 0xee, 0xee};
    EXPECT_EQ(0, std::memcmp(b0, e0, 6));
    EXPECT_EQ(0, std::memcmp(b1, e1, 7));
    EXPECT_FALSE(chain.write(mem, 1, pat, 9));   // one past the end: nothing written
    ASSERT_TRUE(mem.read(Gpa(w1), b1, 7));
    EXPECT_EQ(0, std::memcmp(b1, e1, 7));
    EXPECT_FALSE(chain.write(mem, UINT64_MAX - 1, pat, 4));
}

// The host iovecs of part of a chain (virtio-blk's readv/writev): pieces in
// order, trimmed at both ends, nothing appended on an overrun.
class VirtioBlkIovecs : public VirtqueueTest {};
TEST_F(VirtioBlkIovecs, AppendIovecsTrimsAndRefusesOverruns) {
    std::uint64_t r[3] = {drv.alloc(3), drv.alloc(5), drv.alloc(7)};
    std::uint8_t src[15];
    for (int i = 0; i < 15; ++i) src[i] = static_cast<std::uint8_t>(i);
    ASSERT_TRUE(mem.write(Gpa(r[0]), src, 3));
    ASSERT_TRUE(mem.write(Gpa(r[1]), src + 3, 5));
    ASSERT_TRUE(mem.write(Gpa(r[2]), src + 8, 7));
    const std::uint64_t w = drv.alloc(6, 0xee);
    drv.add_chain({{r[0], 3}, {r[1], 5}, {r[2], 7}, {w, 6, true}});
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;

    std::vector<iovec> iov{{nullptr, 1}};   // appended to, never replaced
    ASSERT_TRUE(chain.append_iovecs(mem, false, 2, 10, iov));
    ASSERT_EQ(iov.size(), 4u);
    EXPECT_EQ(iov[1].iov_len, 1u);
    EXPECT_EQ(iov[2].iov_len, 5u);
    EXPECT_EQ(iov[3].iov_len, 4u);
    std::string got;
    for (std::size_t i = 1; i < iov.size(); ++i) got.append(static_cast<const char*>(iov[i].iov_base), iov[i].iov_len);
    EXPECT_EQ(got, std::string(reinterpret_cast<const char*>(src) + 2, 10));
    ASSERT_TRUE(chain.append_iovecs(mem, true, 0, 5, iov));   // the writable part
    ASSERT_EQ(iov.size(), 5u);
    EXPECT_EQ(iov[4].iov_len, 5u);
    EXPECT_EQ(static_cast<const std::uint8_t*>(iov[4].iov_base)[0], 0xee);
    EXPECT_FALSE(chain.append_iovecs(mem, false, 10, 6, iov));   // one past the end
    EXPECT_FALSE(chain.append_iovecs(mem, true, 1, 6, iov));
    EXPECT_FALSE(chain.append_iovecs(mem, false, UINT64_MAX, 2, iov));
    EXPECT_EQ(iov.size(), 5u);
    ASSERT_TRUE(chain.append_iovecs(mem, false, 15, 0, iov));   // empty at the end: nothing
    EXPECT_EQ(iov.size(), 5u);
}

TEST_F(VirtqueueTest, IndirectChain) {
    q.set_indirect(true);
    std::uint64_t a = drv.alloc(16, 0x11), b = drv.alloc(32, 0);
    std::uint16_t head = drv.add_indirect({{a, 16}, {b, 32, true}}, 0x80000);
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    EXPECT_EQ(chain.head(), head);
    EXPECT_EQ(chain.readable_len(), 16u);
    EXPECT_EQ(chain.writable_len(), 32u);
    std::uint8_t x = 0;
    ASSERT_TRUE(chain.read(mem, 15, &x, 1));
    EXPECT_EQ(x, 0x11);
    EXPECT_TRUE(q.push_used(head, 32));
}

TEST_F(VirtqueueTest, DirectBuffersThenIndirectTable) {
    q.set_indirect(true);
    std::uint64_t a = drv.alloc(8), b = drv.alloc(8);
    drv.put_desc(0x80000, {b, 8, kVirtqDescFWrite, 0});
    drv.set_desc(0, a, 8, kVirtqDescFNext, 1);
    drv.set_desc(1, 0x80000, 16, kVirtqDescFIndirect);
    drv.publish(0);
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    EXPECT_EQ(chain.elems().size(), 2u);
    EXPECT_EQ(chain.writable_len(), 8u);
}

TEST_F(VirtqueueTest, ChainOfExactlyQueueSizeIsAccepted) {
    q.set_indirect(true);
    std::vector<Buf> bufs(8, Buf{0x100000, 1});
    drv.add_indirect(bufs, 0x80000);
    EXPECT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    bufs.push_back(bufs[0]);
    drv.add_indirect(bufs, 0x80000);
    expect_error("longer than the queue size");
}

TEST(Virtqueue, UsedRingAndIndexesWrapPast65535) {
    GuestMemory mem(4 << 20, Backing::off);
    Virtqueue q(mem);
    FakeDriver drv(mem, 4);
    q.set_event_idx(true);
    ASSERT_TRUE(drv.configure(q));
    DescChain c;
    std::uint64_t buf = drv.alloc(4);
    for (std::uint32_t i = 0; i < 70000; ++i) {
        std::uint16_t head = drv.add_chain({{buf, 4, true}});
        ASSERT_EQ(q.pop(c), PopStatus::ok) << i << ": " << q.error().reason;
        ASSERT_EQ(c.head(), head);
        ASSERT_TRUE(c.write(mem, 0, &i, 4));
        // Even steps: the driver asks for an interrupt at this very entry;
        // odd steps: its used_event is already behind.
        auto u = static_cast<std::uint16_t>(i);
        drv.set_used_event(i % 2 == 0 ? u : static_cast<std::uint16_t>(u - 1));
        ASSERT_TRUE(q.push_used(head, i));
        ASSERT_EQ(q.needs_notification(), i % 2 == 0) << i;   // the first decision is always yes
        ASSERT_EQ(drv.used_idx(), static_cast<std::uint16_t>(i + 1));
        ASSERT_EQ(drv.used_elem(u), std::make_pair(std::uint32_t{head}, i));
    }
    EXPECT_EQ(q.last_avail_idx(), static_cast<std::uint16_t>(70000));
    EXPECT_EQ(q.used_idx(), static_cast<std::uint16_t>(70000));
    EXPECT_EQ(q.pop(c), PopStatus::empty);
}

TEST_F(VirtqueueTest, NoInterruptFlagWithoutEventIdx) {
    std::uint16_t head = drv.add_chain({{drv.alloc(1), 1}});
    ASSERT_EQ(q.pop(chain), PopStatus::ok);
    ASSERT_TRUE(q.push_used(head, 0));
    EXPECT_TRUE(q.needs_notification());
    drv.set_avail_flags(kVirtqAvailFNoInterrupt);
    EXPECT_FALSE(q.needs_notification());
    drv.set_used_event(0);   // ignored without EVENT_IDX
    EXPECT_FALSE(q.needs_notification());
}

TEST_F(VirtqueueTest, EventIdxNotificationDecisions) {
    q.set_event_idx(true);
    std::uint64_t b = drv.alloc(1);
    for (int i = 0; i < 6; ++i) drv.add_chain({{b, 1}});
    drv.set_avail_flags(kVirtqAvailFNoInterrupt);   // ignored with EVENT_IDX (2.7.10)
    for (int i = 0; i < 6; ++i) ASSERT_EQ(q.pop(chain), PopStatus::ok);
    drv.set_used_event(2);
    ASSERT_TRUE(q.push_used(0, 0));
    EXPECT_TRUE(q.needs_notification());    // first decision: always
    ASSERT_TRUE(q.push_used(1, 0));          // used idx 1 → 2: entry 1 ≠ used_event
    EXPECT_FALSE(q.needs_notification());
    ASSERT_TRUE(q.push_used(2, 0));          // writes entry 2 == used_event
    EXPECT_TRUE(q.needs_notification());
    ASSERT_TRUE(q.push_used(3, 0));
    EXPECT_FALSE(q.needs_notification());
    EXPECT_FALSE(q.needs_notification());   // nothing new
    drv.set_used_event(4);
    ASSERT_TRUE(q.push_used(4, 0));          // a batch of two that passes used_event
    ASSERT_TRUE(q.push_used(5, 0));
    EXPECT_TRUE(q.needs_notification());
}

TEST_F(VirtqueueTest, NotificationSuppressionWithoutEventIdx) {
    q.disable_notifications();
    EXPECT_EQ(drv.used_flags(), kVirtqUsedFNoNotify);
    EXPECT_FALSE(q.enable_notifications());
    EXPECT_EQ(drv.used_flags(), 0);
    q.disable_notifications();
    drv.add_chain({{drv.alloc(1), 1}});   // arrives while the device was not listening
    EXPECT_TRUE(q.enable_notifications());
    EXPECT_EQ(q.pop(chain), PopStatus::ok);
    EXPECT_FALSE(q.enable_notifications());
}

TEST_F(VirtqueueTest, PopOrEnableNotifications) {
    // Work pending: taken, notifications stay off while the device works.
    q.disable_notifications();
    drv.add_chain({{drv.alloc(1), 1}});
    ASSERT_EQ(q.pop_or_enable_notifications(chain), PopStatus::ok);
    EXPECT_EQ(drv.used_flags(), kVirtqUsedFNoNotify);
    // Dry: empty, and the driver is asked to notify again.
    EXPECT_EQ(q.pop_or_enable_notifications(chain), PopStatus::empty);
    EXPECT_EQ(drv.used_flags(), 0);
    // With EVENT_IDX the re-enable is avail_event = the next index.
    q.set_event_idx(true);
    drv.add_chain({{drv.alloc(1), 1}});
    ASSERT_EQ(q.pop_or_enable_notifications(chain), PopStatus::ok);
    EXPECT_EQ(q.pop_or_enable_notifications(chain), PopStatus::empty);
    EXPECT_EQ(drv.avail_event(), 2);
    // A broken ring reports the error, not empty.
    drv.set_avail_idx(static_cast<std::uint16_t>(drv.avail_idx() + 100));
    EXPECT_EQ(q.pop_or_enable_notifications(chain), PopStatus::error);
}

TEST_F(VirtqueueTest, AvailEventWithEventIdx) {
    q.set_event_idx(true);
    std::uint64_t b = drv.alloc(1);
    drv.add_chain({{b, 1}});
    drv.add_chain({{b, 1}});
    ASSERT_EQ(q.pop(chain), PopStatus::ok);
    q.set_avail_event();
    EXPECT_EQ(drv.avail_event(), 1);
    q.disable_notifications();
    EXPECT_EQ(drv.used_flags(), 0);   // flags are not used with EVENT_IDX
    EXPECT_TRUE(q.enable_notifications());   // one still pending
    EXPECT_EQ(drv.avail_event(), 1);
    ASSERT_EQ(q.pop(chain), PopStatus::ok);
    EXPECT_FALSE(q.enable_notifications());
    EXPECT_EQ(drv.avail_event(), 2);
}

// ---- malformed rings and chains --------------------------------------------

TEST_F(VirtqueueErrors, LoopThroughNext) {
    std::uint64_t b = drv.alloc(1);
    drv.set_desc(0, b, 1, kVirtqDescFNext, 1);
    drv.set_desc(1, b, 1, kVirtqDescFNext, 0);
    drv.publish(0);
    expect_error("loops");
}

TEST_F(VirtqueueErrors, SelfLoopInIndirectTable) {
    q.set_indirect(true);
    drv.put_desc(0x80000, {drv.alloc(1), 1, kVirtqDescFNext, 0});   // entry 0 → entry 0
    drv.set_desc(0, 0x80000, 16, kVirtqDescFIndirect);
    drv.publish(0);
    expect_error("loops");
}

TEST_F(VirtqueueErrors, IndirectTablePointingAtItself) {
    q.set_indirect(true);
    drv.put_desc(0x80000, {0x80000, 16, kVirtqDescFIndirect, 0});
    drv.set_desc(0, 0x80000, 16, kVirtqDescFIndirect);
    drv.publish(0);
    expect_error("nested INDIRECT");
}

TEST_F(VirtqueueErrors, NestedIndirect) {
    q.set_indirect(true);
    drv.put_desc(0x81000, {drv.alloc(1), 1, 0, 0});
    drv.put_desc(0x80000, {drv.alloc(1), 1, kVirtqDescFNext, 1});
    drv.put_desc(0x80010, {0x81000, 16, kVirtqDescFIndirect, 0});
    drv.set_desc(0, 0x80000, 32, kVirtqDescFIndirect);
    drv.publish(0);
    expect_error("nested INDIRECT");
}

TEST_F(VirtqueueErrors, IndirectWithNext) {
    q.set_indirect(true);
    drv.put_desc(0x80000, {drv.alloc(1), 1, 0, 0});
    drv.set_desc(0, 0x80000, 16, kVirtqDescFIndirect | kVirtqDescFNext, 1);
    drv.set_desc(1, drv.alloc(1), 1, 0);
    drv.publish(0);
    expect_error("INDIRECT descriptor with NEXT");
}

TEST_F(VirtqueueErrors, IndirectWithoutFeature) {
    drv.add_indirect({{drv.alloc(1), 1}}, 0x80000);
    expect_error("without VIRTIO_F_INDIRECT_DESC");
}

TEST_F(VirtqueueErrors, IndirectTableBadLength) {
    for (std::uint32_t len : {0u, 8u, 17u}) {
        q.reset();
        q.set_indirect(true);
        ASSERT_TRUE(drv.configure(q));
        drv.set_avail_idx(0);
        drv.set_desc(0, 0x80000, len, kVirtqDescFIndirect);
        drv.publish(0);
        expect_error("multiple of 16");
    }
}

TEST_F(VirtqueueErrors, IndirectTableOutsideRam) {
    q.set_indirect(true);
    drv.set_desc(0, mem.size() - 16, 32, kVirtqDescFIndirect);   // straddles the end
    drv.publish(0);
    expect_error("indirect table not entirely in guest RAM");
}

TEST_F(VirtqueueErrors, IndirectNextBeyondTable) {
    q.set_indirect(true);
    drv.put_desc(0x80000, {drv.alloc(1), 1, kVirtqDescFNext, 1});   // table has 1 entry
    drv.put_desc(0x80010, {drv.alloc(1), 1, 0, 0});
    drv.set_desc(0, 0x80000, 16, kVirtqDescFIndirect);
    drv.publish(0);
    expect_error("next index out of range");
}

TEST_F(VirtqueueErrors, NextOutOfRange) {
    drv.set_desc(0, drv.alloc(1), 1, kVirtqDescFNext, 8);
    drv.publish(0);
    expect_error("next index out of range");
}

TEST_F(VirtqueueErrors, HeadOutOfRange) {
    drv.publish(8);
    expect_error("head index out of range");
}

TEST_F(VirtqueueErrors, AvailIdxJumpsTooFar) {
    std::uint64_t b = drv.alloc(1);
    for (int i = 0; i < 8; ++i) drv.set_desc(static_cast<std::uint16_t>(i), b, 1, 0);
    drv.set_avail_idx(8);   // exactly a full ring is fine
    for (int i = 0; i < 8; ++i) ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    drv.set_avail_idx(17);  // 9 ahead of last_avail = 8
    expect_error("more than queue size ahead");
}

TEST_F(VirtqueueErrors, AvailIdxGoingBackwardsIsAnError) {
    drv.set_avail_idx(0xffff);   // 65535 ahead, i.e. one behind
    expect_error("more than queue size ahead");
}

TEST_F(VirtqueueErrors, WritableBeforeReadable) {
    drv.add_chain({{drv.alloc(1), 1, true}, {drv.alloc(1), 1}});
    expect_error("device-readable descriptor after a device-writable one");
}

TEST_F(VirtqueueErrors, BuffersAtTheEndOfRam) {
    const std::uint64_t end = mem.size();
    drv.add_chain({{end - 16, 16}, {end - 1, 1, true}});   // flush with the end: fine
    ASSERT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
    const Buf bad[] = {{end - 8, 16}, {end, 0}, {end, 1}, {UINT64_MAX - 7, 16}, {kMmioHoleStart, 4},
                       {kHighRamStart, 4}, {8, UINT32_MAX}};
    for (const Buf& b : bad) {
        q.reset();
        ASSERT_TRUE(drv.configure(q));
        drv.set_avail_idx(0);
        drv.add_chain({b});
        expect_error("buffer not entirely in guest RAM");
    }
}

TEST_F(VirtqueueErrors, ErrorIsStickyUntilReset) {
    drv.publish(9);
    expect_error("head index out of range");
    drv.set_avail_idx(0);
    drv.add_chain({{drv.alloc(1), 1}});   // a good chain now
    EXPECT_EQ(q.pop(chain), PopStatus::error);
    EXPECT_FALSE(q.push_used(0, 0));
    EXPECT_FALSE(q.enable_notifications());
    EXPECT_FALSE(drv.configure(q));   // re-enabling is not enough
    EXPECT_NE(std::string(q.error().reason).find("head index"), std::string::npos);
    q.reset();
    EXPECT_FALSE(q.failed());
    EXPECT_FALSE(q.ready());
    ASSERT_TRUE(drv.configure(q));
    EXPECT_EQ(q.pop(chain), PopStatus::ok) << q.error().reason;
}

// Needs RAM on both sides of the MMIO hole: 3 GiB + 4 MiB, untouched except
// where written (MAP_NORESERVE).
TEST(VirtqueueBigRam, LengthsNear4GiBAndTheMmioHole) {
    GuestMemory mem(kMmioHoleStart + (4 << 20), Backing::off);
    ASSERT_EQ(mem.regions().size(), 2u);
    Virtqueue q(mem);
    FakeDriver drv(mem, 8);
    DescChain c;
    const std::uint64_t high_end = kHighRamStart + (4 << 20);
    auto expect_pop = [&](const std::vector<Buf>& bufs, PopStatus want) {
        q.reset();
        EXPECT_TRUE(drv.configure(q));
        drv.set_avail_idx(0);
        drv.add_chain(bufs);
        EXPECT_EQ(q.pop(c), want) << q.error().reason;
        return std::string(q.error().reason);
    };
    // 3 GiB + (1 GiB - 1) = UINT32_MAX: the largest total that fits used->len.
    expect_pop({{0, 0xc0000000}, {0, 0x3fffffff, true}}, PopStatus::ok);
    EXPECT_EQ(c.readable_len() + c.writable_len(), UINT32_MAX);
    EXPECT_NE(expect_pop({{0, 0xc0000000}, {0, 0x40000000, true}}, PopStatus::error).find("4 GiB"),
              std::string::npos);
    expect_pop({{0, 0xffffffff}, {0, 0xffffffff}}, PopStatus::error);
    expect_pop({{kMmioHoleStart - 8, 16}}, PopStatus::error);   // straddles into the hole
    expect_pop({{0xfee00000, 4}}, PopStatus::error);            // LAPIC, in the hole
    expect_pop({{kHighRamStart - 4, 8}}, PopStatus::error);     // straddles out of the hole
    expect_pop({{kHighRamStart, 4 << 20}}, PopStatus::ok);
    expect_pop({{high_end - 1, 2}}, PopStatus::error);
    expect_pop({{kMmioHoleStart - 16, 16}, {high_end - 16, 16, true}}, PopStatus::ok);
    std::uint64_t v = 0x1122334455667788;
    ASSERT_TRUE(c.write(mem, 8, &v, 8));
    EXPECT_EQ(mem.read_obj<std::uint64_t>(Gpa(high_end - 8)), v);
}

// Random and adversarial rings: pop must always terminate, every chain it
// accepts must satisfy the invariants, and nothing may touch memory outside
// the mapping (ASan/UBSan builds check that).
TEST(VirtqueueFuzz, RandomRingsNeverCrashOrHang) {
    GuestMemory mem(kMmioHoleStart + (4 << 20), Backing::off);
    const std::uint64_t high_end = kHighRamStart + (4 << 20);
    std::mt19937_64 rng(0x6b677565u);
    auto pick = [&](std::uint64_t n) { return rng() % n; };
    auto addr = [&]() -> std::uint64_t {
        switch (pick(8)) {
        case 0: return pick(4 << 20);                           // low RAM, rings included
        case 1: return 0x80000 + 16 * pick(64);                 // the indirect table area
        case 2: return kMmioHoleStart - pick(64);               // end of low RAM
        case 3: return kMmioHoleStart + pick(1ull << 30);       // the hole
        case 4: return kHighRamStart + pick(4 << 20);
        case 5: return high_end - pick(64);
        case 6: return UINT64_MAX - pick(64);
        default: return rng();
        }
    };
    auto len = [&]() -> std::uint32_t {
        switch (pick(5)) {
        case 0: return static_cast<std::uint32_t>(pick(64));
        case 1: return 16 * static_cast<std::uint32_t>(pick(20));   // plausible indirect tables
        case 2: return UINT32_MAX - static_cast<std::uint32_t>(pick(64));
        case 3: return 0x80000000u + static_cast<std::uint32_t>(pick(16));
        default: return static_cast<std::uint32_t>(rng());
        }
    };
    // Each round mixes plausible descriptors (so that chains get accepted and
    // used) with hostile ones in a random proportion.
    unsigned sane_pct = 0;
    auto desc = [&](std::uint16_t size) {
        auto next = static_cast<std::uint16_t>(pick(size));
        if (pick(100) < sane_pct) {
            switch (pick(4)) {
            case 0: return Descriptor{0x100000 + pick(0x200000), static_cast<std::uint32_t>(pick(4096)), 0, 0};
            case 1: return Descriptor{0x100000 + pick(0x200000), static_cast<std::uint32_t>(pick(4096)),
                                      kVirtqDescFWrite, 0};
            case 2: return Descriptor{0x100000 + pick(0x200000), static_cast<std::uint32_t>(pick(4096)),
                                      kVirtqDescFNext, next};
            default: return Descriptor{0x80000 + 16 * pick(32), 16 * static_cast<std::uint32_t>(1 + pick(16)),
                                       kVirtqDescFIndirect, 0};
            }
        }
        return Descriptor{addr(), len(), static_cast<std::uint16_t>(pick(4) == 0 ? rng() : pick(8)),
                          static_cast<std::uint16_t>(pick(4) == 0 ? rng() : pick(size + 2u))};
    };

    // Offsets near either end of a part: big buffers must not make the test
    // touch (and so allocate) gigabytes of guest RAM.
    auto offset = [&](std::uint64_t total) {
        return pick(2) != 0 ? pick(64) : std::max<std::uint64_t>(total, 300) - 300 + pick(332);
    };

    Virtqueue q(mem);
    DescChain c;
    std::vector<std::uint8_t> scratch(256);
    unsigned oks = 0, errors = 0;
    for (int round = 0; round < 2000; ++round) {
        auto size = static_cast<std::uint16_t>(1u << pick(9));
        sane_pct = static_cast<unsigned>(std::min<std::uint64_t>(100, 40 * pick(4)));
        FakeDriver drv(mem, size);
        q.reset();
        q.set_indirect(sane_pct == 100 || pick(2) != 0);
        q.set_event_idx(pick(2) != 0);
        ASSERT_TRUE(drv.configure(q));
        for (std::uint16_t i = 0; i < size; ++i) drv.put_desc(drv.desc() + 16ull * i, desc(size));
        for (int i = 0; i < 64; ++i) drv.put_desc(0x80000 + 16 * i, desc(size));
        for (std::uint16_t i = 0; i < size; ++i)
            mem.write_obj<std::uint16_t>(Gpa(drv.avail() + 4 + 2ull * i),
                                         static_cast<std::uint16_t>(pick(100) < sane_pct ? pick(size) : rng()));
        // A plausible avail->idx: up to a full ring ahead of what was consumed.
        auto kick = [&] {
            drv.set_avail_idx(static_cast<std::uint16_t>(
                pick(100) < sane_pct ? q.last_avail_idx() + pick(size + 1u) : rng()));
        };
        kick();
        for (int iter = 0; iter < 64; ++iter) {
            PopStatus st = q.pop(c);
            if (st == PopStatus::error) {
                ++errors;
                ASSERT_EQ(q.pop(c), PopStatus::error);
                break;
            }
            if (st == PopStatus::empty) {
                if (!q.enable_notifications() && pick(4) == 0) break;
                kick();
                continue;
            }
            ++oks;
            ASSERT_LT(c.head(), size);
            ASSERT_LE(c.elems().size(), size);
            std::uint64_t total = 0;
            bool seen_write = false;
            for (const DescChainElem& e : c.elems()) {
                ASSERT_TRUE(mem.contains(e.addr, e.len));
                ASSERT_FALSE(seen_write && !e.write);
                seen_write = e.write;
                total += e.len;
            }
            ASSERT_LE(total, UINT32_MAX);
            ASSERT_EQ(total, c.readable_len() + c.writable_len());
            for (int k = 0; k < 4; ++k) {
                std::uint64_t off = offset(c.readable_len()), n = pick(scratch.size() + 1);
                bool fits = off + n <= c.readable_len();
                ASSERT_EQ(c.read(mem, off, scratch.data(), n), fits);
                off = offset(c.writable_len());
                fits = off + n <= c.writable_len();
                ASSERT_EQ(c.write(mem, off, scratch.data(), n), fits);
            }
            ASSERT_TRUE(q.push_used(c.head(), static_cast<std::uint32_t>(rng())));
            q.needs_notification();
            q.set_avail_event();
            // The guest keeps scribbling on its rings while we work.
            drv.put_desc(drv.desc() + 16 * pick(size), desc(size));
            if (pick(4) == 0) kick();
            if (pick(4) == 0) drv.set_used_event(static_cast<std::uint16_t>(rng()));
        }
    }
    // The run must have exercised both outcomes, not just rejected everything.
    EXPECT_GT(oks, 2000u) << errors;
    EXPECT_GT(errors, 600u) << oks;
}

} // namespace
} // namespace kguest
