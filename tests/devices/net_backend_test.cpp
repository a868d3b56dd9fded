// virtio-net packet backends (devices/net_backend.hpp): the length-prefixed
// UNIX stream with frames split and coalesced at every byte boundary, oversized and truncated frames, queued partial writes, and
// a real TAP interface (named kgb*) exchanging frames with an AF_PACKET
// socket, directly and through the virtio-net device. The TAP tests skip only
// when /dev/net/tun cannot be opened for lack of permission or of the node.
#include "devices/net_backend.hpp"
#include "devices/virtio_net.hpp"
#include "devices/base/error.hpp"

#include "tests/support/backend_io.hpp"
#include "tests/support/fake_virtio.hpp"

#include <arpa/inet.h>
#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <linux/if_packet.h>
#include <linux/if_tun.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace kguest {
namespace {

// ---- StreamBackend ----

struct StreamPair {
    Fd peer;
    std::unique_ptr<StreamBackend> b;
    std::unique_ptr<test::BackendIo> io;   // goes before b does
    StreamPair() {
        int sv[2];
        EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        peer = Fd(sv[1]);
        b = std::make_unique<StreamBackend>(Fd(sv[0]), "pair");
        io = std::make_unique<test::BackendIo>(*b);
    }
    void put(const std::vector<std::uint8_t>& bytes) const {
        ASSERT_EQ(::send(peer.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()));
    }
};

std::vector<std::uint8_t> wire(const std::vector<std::uint8_t>& frame) {
    std::vector<std::uint8_t> w(4 + frame.size());
    const std::uint32_t be = htonl(static_cast<std::uint32_t>(frame.size()));
    std::memcpy(w.data(), &be, 4);
    if (!frame.empty()) std::memcpy(w.data() + 4, frame.data(), frame.size());
    return w;
}

std::vector<std::uint8_t> frame_of(std::size_t n, std::uint8_t seed) {
    std::vector<std::uint8_t> f(n);
    for (std::size_t i = 0; i < n; ++i) f[i] = static_cast<std::uint8_t>(seed ^ (i * 13));
    return f;
}

TEST(NetBackendStream, PartialFramesReassembleAtEveryBoundary) {
    StreamPair s;
    std::vector<std::uint8_t> buf(kMaxPacketLen);
    const auto f = frame_of(64, 5);
    const auto w = wire(f);
    // Split after every possible byte, the length prefix included.
    for (std::size_t cut = 1; cut < w.size(); ++cut) {
        s.put({w.begin(), w.begin() + static_cast<std::ptrdiff_t>(cut)});
        EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::again) << cut;
        s.put({w.begin() + static_cast<std::ptrdiff_t>(cut), w.end()});
        const NetIoResult r = s.io->read_frame(0, buf);
        ASSERT_EQ(r.status, NetIo::ok) << cut;
        ASSERT_EQ(r.len, f.size());
        EXPECT_TRUE(std::equal(f.begin(), f.end(), buf.begin()));
    }
    // The prefix one byte at a time.
    for (std::size_t i = 0; i < w.size(); ++i) {
        EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::again);
        s.put({w[i]});
    }
    EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::ok);
    EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::again);
}

TEST(NetBackendStream, SeveralFramesInOneReadAndOversizedSkipped) {
    StreamPair s;
    std::vector<std::uint8_t> buf(kMaxPacketLen);
    auto all = wire(frame_of(10, 1));
    auto zero = wire({});   // an empty frame is skipped silently
    all.insert(all.end(), zero.begin(), zero.end());
    std::vector<std::uint8_t> big = wire(frame_of(kMaxFrameLen + 1, 2));   // too big: dropped
    all.insert(all.end(), big.begin(), big.end());
    auto last = wire(frame_of(kMaxFrameLen, 3));
    all.insert(all.end(), last.begin(), last.end());
    std::thread writer([&] { s.put(all); });
    std::vector<NetIoResult> got;
    ASSERT_TRUE(fake::wait_until([&] {
        const NetIoResult r = s.io->read_frame(0, buf);
        if (r.status != NetIo::again) got.push_back(r);
        return got.size() == 3;
    }));
    writer.join();
    EXPECT_EQ(got[0].status, NetIo::ok);
    EXPECT_EQ(got[0].len, 10u);
    EXPECT_EQ(got[1].status, NetIo::drop);
    EXPECT_EQ(got[2].status, NetIo::ok);
    EXPECT_EQ(got[2].len, kMaxFrameLen);
    const auto want = frame_of(kMaxFrameLen, 3);
    EXPECT_TRUE(std::equal(want.begin(), want.end(), buf.begin()));
}

TEST(NetBackendStream, HangupMidFrameDropsThenCloses) {
    StreamPair s;
    std::vector<std::uint8_t> buf(kMaxPacketLen);
    auto w = wire(frame_of(100, 1));
    s.put({w.begin(), w.begin() + 50});
    s.peer.reset();
    EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::drop);
    EXPECT_EQ(s.io->read_frame(0, buf).status, NetIo::closed);
    const std::uint8_t x[14] = {};
    iovec v{const_cast<std::uint8_t*>(x), sizeof x};
    EXPECT_EQ(s.b->write_frame(0, {&v, 1}).status, NetIo::closed);
}

TEST(NetBackendStream, PartialWritesQueueAndFlushInOrder) {
    StreamPair s;
    const int small = 4096;
    ASSERT_EQ(::setsockopt(s.b->read_op(0).fd, SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    // Write frames until the backend refuses one; all accepted ones must
    // come out intact and in order.
    std::vector<std::vector<std::uint8_t>> sent;
    for (int i = 0; i < 10000; ++i) {
        auto f = frame_of(1000 + i % 500, static_cast<std::uint8_t>(i));
        iovec v[2] = {{f.data(), 10}, {f.data() + 10, f.size() - 10}};
        const NetIoResult r = s.b->write_frame(0, v);
        if (r.status == NetIo::again) break;
        ASSERT_EQ(r.status, NetIo::ok);
        ASSERT_EQ(r.len, f.size());
        sent.push_back(std::move(f));
    }
    ASSERT_TRUE(s.b->wants_write(0));
    ASSERT_LT(sent.size(), 10000u);   // hit the queue limit
    std::vector<std::uint8_t> rx;
    std::size_t frames = 0, off = 0;
    while (frames < sent.size()) {
        (void)s.io->flush(0, 0);
        std::vector<std::uint8_t> chunk(65536);
        pollfd pfd{s.peer.get(), POLLIN, 0};
        if (::poll(&pfd, 1, 1000) != 1) break;
        const ssize_t n = ::recv(s.peer.get(), chunk.data(), chunk.size(), 0);
        ASSERT_GT(n, 0);
        rx.insert(rx.end(), chunk.begin(), chunk.begin() + n);
        while (rx.size() - off >= 4) {
            const std::uint32_t len = std::uint32_t{rx[off]} << 24 | rx[off + 1] << 16 | rx[off + 2] << 8 | rx[off + 3];
            if (rx.size() - off < 4 + len) break;
            ASSERT_EQ(len, sent[frames].size()) << frames;
            ASSERT_TRUE(std::equal(sent[frames].begin(), sent[frames].end(), rx.begin() + off + 4)) << frames;
            off += 4 + len;
            ++frames;
        }
    }
    EXPECT_EQ(frames, sent.size());
    EXPECT_EQ(s.io->flush(0), NetIo::ok);
    EXPECT_FALSE(s.b->wants_write(0));
}

TEST(NetBackendStream, ConnectsByPathAndFailsWithSysError) {
    const std::string path = "/tmp/kguest-netbackend-" + std::to_string(::getpid()) + ".sock";
    ::unlink(path.c_str());
    EXPECT_THROW(StreamBackend{path}, SysError);
    Fd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size());
    ASSERT_EQ(::bind(listener.get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ASSERT_EQ(::listen(listener.get(), 1), 0);
    NetConfig cfg;
    cfg.kind = NetConfig::Kind::stream;
    cfg.target = path;
    auto b = open_backend(cfg);
    EXPECT_FALSE(b->has_vnet_hdr());
    EXPECT_EQ(b->num_queues(), 1u);
    Fd peer(::accept(listener.get(), nullptr, nullptr));
    ASSERT_TRUE(peer.valid());
    const auto f = frame_of(60, 1);
    iovec v{const_cast<std::uint8_t*>(f.data()), f.size()};
    EXPECT_EQ(b->write_frame(0, {&v, 1}).status, NetIo::ok);
    {
        test::BackendIo io(*b);
        EXPECT_EQ(io.flush(0), NetIo::ok);
    }
    std::vector<std::uint8_t> got(64);
    ASSERT_EQ(::recv(peer.get(), got.data(), 64, MSG_WAITALL), 64);
    EXPECT_EQ(got, wire(f));
    ::unlink(path.c_str());
}

// ---- TAP ----

constexpr std::uint16_t kEtherTypeTest = 0x88b5;   // IEEE local experimental

// Opens TAP `name`, or skips the test when this host cannot have one.
std::unique_ptr<TapBackend> open_tap_or_skip(const std::string& name, bool& skipped) {
    skipped = false;
    try {
        return std::make_unique<TapBackend>(name);
    } catch (const SysError& e) {
        if (e.err() == EPERM || e.err() == ENOENT || e.err() == EACCES) {
            skipped = true;
            return nullptr;
        }
        throw;
    }
}

// Brings `name` up and returns an AF_PACKET socket bound to it.
Fd packet_socket(const std::string& name) {
    Fd ctl(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    ifreq ifr{};
    std::memcpy(ifr.ifr_name, name.data(), name.size());
    EXPECT_EQ(::ioctl(ctl.get(), SIOCGIFFLAGS, &ifr), 0) << std::strerror(errno);
    ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
    EXPECT_EQ(::ioctl(ctl.get(), SIOCSIFFLAGS, &ifr), 0) << std::strerror(errno);
    Fd pkt(::socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(kEtherTypeTest)));
    EXPECT_TRUE(pkt.valid()) << std::strerror(errno);
    sockaddr_ll sll{};
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(kEtherTypeTest);
    sll.sll_ifindex = static_cast<int>(::if_nametoindex(name.c_str()));
    EXPECT_NE(sll.sll_ifindex, 0);
    EXPECT_EQ(::bind(pkt.get(), reinterpret_cast<sockaddr*>(&sll), sizeof sll), 0) << std::strerror(errno);
    return pkt;
}

std::vector<std::uint8_t> test_frame(std::size_t len, std::uint8_t seed) {
    std::vector<std::uint8_t> f = frame_of(len, seed);
    std::memset(f.data(), 0xff, 6);                       // broadcast destination
    const std::uint8_t src[6] = {0x02, 0, 0, 0, 0, seed};
    std::memcpy(f.data() + 6, src, 6);
    f[12] = kEtherTypeTest >> 8;
    f[13] = kEtherTypeTest & 0xff;
    return f;
}

// Reads frames from the TAP until one of our EtherType shows up (IPv6 may
// send router solicitations and the like once the link is up).
std::vector<std::uint8_t> tap_read_test_frame(test::BackendIo& tap) {
    std::vector<std::uint8_t> buf(kMaxPacketLen + 64);
    std::vector<std::uint8_t> out;
    fake::wait_until([&] {
        const NetIoResult r = tap.read_frame(0, buf);
        if (r.status != NetIo::ok) return false;
        if (r.len >= kVnetHdrLen + 14 && buf[kVnetHdrLen + 12] == (kEtherTypeTest >> 8) &&
            buf[kVnetHdrLen + 13] == (kEtherTypeTest & 0xff)) {
            out.assign(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(r.len));
            return true;
        }
        return false;
    });
    return out;
}

TEST(NetBackendTap, FramesBothWaysThroughARealTap) {
    bool skipped;
    auto tap = open_tap_or_skip("kgbtest0", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    EXPECT_EQ(tap->describe(), "tap kgbtest0");
    EXPECT_TRUE(tap->has_vnet_hdr());
    EXPECT_EQ(tap->set_offloads(TUN_F_CSUM), 0);
    EXPECT_EQ(tap->set_offloads(0), 0);
    Fd pkt = packet_socket("kgbtest0");
    test::BackendIo io(*tap);

    // Host -> TAP fd (the guest's RX): a 12-byte vnet header in front.
    const auto in = test_frame(100, 1);
    ASSERT_EQ(::send(pkt.get(), in.data(), in.size(), 0), static_cast<ssize_t>(in.size())) << std::strerror(errno);
    const auto got = tap_read_test_frame(io);
    ASSERT_EQ(got.size(), kVnetHdrLen + in.size());
    EXPECT_EQ(got[1], VIRTIO_NET_HDR_GSO_NONE);
    EXPECT_TRUE(std::equal(in.begin(), in.end(), got.begin() + kVnetHdrLen));

    // TAP fd -> host (the guest's TX), header and frame in separate pieces.
    const auto out = test_frame(200, 2);
    std::uint8_t hdr[kVnetHdrLen] = {};
    iovec v[2] = {{hdr, sizeof hdr}, {const_cast<std::uint8_t*>(out.data()), out.size()}};
    ASSERT_EQ(tap->write_frame(0, v).status, NetIo::ok);
    ASSERT_EQ(io.flush(0), NetIo::ok);
    std::vector<std::uint8_t> rbuf(2048);
    pollfd pfd{pkt.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
    const ssize_t n = ::recv(pkt.get(), rbuf.data(), rbuf.size(), 0);
    ASSERT_EQ(n, static_cast<ssize_t>(out.size()));
    EXPECT_TRUE(std::equal(out.begin(), out.end(), rbuf.begin()));
    // A frame shorter than the vnet header is dropped, not fatal.
    iovec tiny{hdr, 4};
    EXPECT_EQ(tap->write_frame(0, {&tiny, 1}).status, NetIo::drop);
}

TEST(NetBackendTap, MultiQueueTapAndFactory) {
    bool skipped;
    auto probe = open_tap_or_skip("kgbtest1", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    probe.reset();   // the non-persistent interface goes away
    NetConfig cfg;
    cfg.target = "kgbtest1";
    cfg.queue_pairs = 2;
    auto b = open_backend(cfg);
    EXPECT_EQ(b->num_queues(), 2u);
    EXPECT_NE(b->read_op(0).fd, b->read_op(1).fd);
    EXPECT_EQ(b->set_queue_enabled(1, false), 0);
    EXPECT_EQ(b->set_queue_enabled(1, true), 0);
    EXPECT_EQ(b->describe(), "tap kgbtest1");
}

TEST(NetBackendTap, TapNameTooLongIsRejected) {
    EXPECT_THROW(TapBackend("kgb-name-too-long"), UsageError);
}

TEST(NetBackendTap, VirtioNetTransmitsAndReceivesThroughTap) {
    bool skipped;
    auto tap = open_tap_or_skip("kgbtest2", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    Fd pkt = packet_socket("kgbtest2");
    GuestMemory mem(16 << 20, Backing::off);
    fake::Transport tr;
    std::vector<Virtqueue> queues;
    queues.emplace_back(mem);
    queues.emplace_back(mem);
    fake::Driver rx(mem, 64, 0x10000, 0x100000), tx(mem, 64, 0x20000, 0x400000);
    ASSERT_TRUE(rx.configure(queues[0]));
    ASSERT_TRUE(tx.configure(queues[1]));
    VirtioNet dev(std::move(tap), MacAddress{0x52, 0x54, 0, 0x12, 0x34, 0x56});
    EXPECT_TRUE(dev.device_features() & virtio_bit(VIRTIO_NET_F_GUEST_CSUM));
    EXPECT_TRUE(dev.device_features() & virtio_bit(VIRTIO_NET_F_HOST_TSO4));
    dev.attach(&tr);
    tr.features = virtio_bit(VIRTIO_F_VERSION_1) | virtio_bit(VIRTIO_NET_F_MRG_RXBUF) |
                  virtio_bit(VIRTIO_NET_F_CSUM) | virtio_bit(VIRTIO_NET_F_GUEST_CSUM);
    ASSERT_TRUE(dev.accept_features(tr.features));
    dev.activate(queues, mem);

    // Guest TX -> the TAP -> our packet socket.
    const auto out = test_frame(300, 3);
    const std::uint64_t hdr = tx.alloc(12), body = tx.alloc(300);
    ASSERT_TRUE(mem.write(Gpa(body), out.data(), out.size()));
    tx.add_chain({{hdr, 12}, {body, 300}});
    dev.queue_notify(1);
    std::vector<std::uint8_t> rbuf(2048);
    pollfd pfd{pkt.get(), POLLIN, 0};
    ASSERT_EQ(::poll(&pfd, 1, 5000), 1);
    ASSERT_EQ(::recv(pkt.get(), rbuf.data(), rbuf.size(), 0), 300);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), rbuf.begin()));

    // Host -> the TAP -> guest RX (other frames, e.g. IPv6 chatter, may come first).
    std::vector<std::uint64_t> bufs;
    for (int i = 0; i < 32; ++i) {
        bufs.push_back(rx.alloc(2048));
        rx.add_chain({{bufs.back(), 2048, true}});
    }
    dev.queue_notify(0);
    const auto in = test_frame(120, 4);
    ASSERT_EQ(::send(pkt.get(), in.data(), in.size(), 0), 120);
    bool found = false;
    std::uint16_t seen = 0;
    ASSERT_TRUE(fake::wait_until([&] {
        for (; seen < rx.used_idx(); ++seen) {
            auto [id, len] = rx.used_elem(seen);
            std::vector<std::uint8_t> got(len);
            EXPECT_TRUE(mem.read(Gpa(bufs[id]), got.data(), len));
            if (len == 12 + in.size() && std::equal(in.begin(), in.end(), got.begin() + 12)) {
                found = true;
                EXPECT_EQ(got[10] | got[11] << 8, 1);   // num_buffers
            }
        }
        return found;
    }));
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
    EXPECT_GE(dev.counters().tx_packets, 1u);
    EXPECT_GE(dev.counters().rx_packets, 1u);
}

// Deletes the interface `name` as an administrator would (`ip link delete`):
// its TAP fds stay open and read EBADFD from then on. False if it could not.
bool delete_link(const std::string& name) {
    return std::system(("ip link delete " + name + " >/dev/null 2>&1").c_str()) == 0;
}

TEST(NetBackendTap, DeletedInterfaceReadsClosed) {
    bool skipped;
    auto tap = open_tap_or_skip("kgbhb0", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    test::BackendIo io(*tap);
    std::vector<std::uint8_t> buf(kMaxPacketLen + 64);
    EXPECT_EQ(io.read_frame(0, buf, 10).status, NetIo::again);   // a read waits
    if (!delete_link("kgbhb0")) GTEST_SKIP() << "cannot delete a link here";
    const NetIoResult r = io.read_frame(0, buf, 1000);
    EXPECT_EQ(r.status, NetIo::closed) << "EBADFD of an attached queue is the interface going away";
    EXPECT_EQ(r.err, EBADFD);
}

TEST(NetBackendTap, DetachedQueueIsNotClosed) {
    bool skipped;
    auto probe = open_tap_or_skip("kgbhb1", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    probe.reset();
    TapBackend tap("kgbhb1", 2);
    ASSERT_EQ(tap.set_queue_enabled(1, false), 0);
    test::BackendIo io(tap);
    std::vector<std::uint8_t> buf(kMaxPacketLen + 64);
    // A detached queue reads EBADFD too, but the interface is still there.
    EXPECT_EQ(io.read_frame(1, buf, 50).status, NetIo::again);
    EXPECT_EQ(io.read_frame(0, buf, 10).status, NetIo::again);
    ASSERT_EQ(tap.set_queue_enabled(1, true), 0);
    EXPECT_EQ(io.read_frame(1, buf, 10).status, NetIo::again);
}

TEST(NetBackendTap, VirtioNetGoesIdleWithLinkDownWhenItsTapIsDeleted) {
    // Deleting the interface under a running guest: the receive path must
    // not re-post a read that fails at once forever (100% CPU); the device
    // reports the link down (5.1.4) with a configuration interrupt.
    bool skipped;
    auto tap = open_tap_or_skip("kgbhb2", skipped);
    if (skipped) GTEST_SKIP() << "no /dev/net/tun access here";
    GuestMemory mem(16 << 20, Backing::off);
    fake::Transport tr;
    std::vector<Virtqueue> queues;
    queues.emplace_back(mem);
    queues.emplace_back(mem);
    fake::Driver rx(mem, 64, 0x10000, 0x100000), tx(mem, 64, 0x20000, 0x400000);
    ASSERT_TRUE(rx.configure(queues[0]));
    ASSERT_TRUE(tx.configure(queues[1]));
    VirtioNet dev(std::move(tap), MacAddress{0x52, 0x54, 0, 0x12, 0x34, 0x57});
    dev.attach(&tr);
    tr.features = virtio_bit(VIRTIO_F_VERSION_1) | virtio_bit(VIRTIO_NET_F_MRG_RXBUF) |
                  virtio_bit(VIRTIO_NET_F_STATUS);
    dev.activate(queues, mem);
    for (int i = 0; i < 32; ++i) rx.add_chain({{rx.alloc(2048), 2048, true}});
    dev.queue_notify(0);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (!delete_link("kgbhb2")) GTEST_SKIP() << "cannot delete a link here";
    auto status = [&] {
        std::uint8_t st[2];
        dev.read_config(6, st);
        return st[0] | st[1] << 8;
    };
    EXPECT_TRUE(fake::wait_until([&] { return status() == 0; }, 2000)) << "the link stays up";
    EXPECT_GE(tr.config_calls.load(), 1);
    rusage before{}, after{};
    ::getrusage(RUSAGE_SELF, &before);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    ::getrusage(RUSAGE_SELF, &after);
    auto us = [](const rusage& r) {
        return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1000000ll + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
    };
    EXPECT_LT(us(after) - us(before), 50000) << "the receive path spins on the deleted TAP";
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

} // namespace
} // namespace kguest
