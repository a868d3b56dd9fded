// virtio-net device model (VIRTIO 1.2 section 5.1) without KVM or a
// transport: the test activates the device with Virtqueues it configured
// over rings the fake driver (support/fake_virtio.hpp) lays out in a real
// GuestMemory, and the far end of a StreamBackend is the other half of a
// socketpair. It checks TX framing, RX with and without mergeable buffers,
// RX backpressure and kicks through notify eventfds, malformed chains
// (DEVICE_NEEDS_RESET, loop alive), reset under traffic and under a guest
// republishing a tiny buffer forever, and the multiqueue control command.
#include "devices/virtio_net.hpp"

#include "tests/support/fake_virtio.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

namespace kguest {
namespace {

using fake::Buf;
using fake::wait_until;

constexpr MacAddress kMac{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};

std::vector<std::uint8_t> make_frame(std::size_t len, std::uint8_t seed) {
    std::vector<std::uint8_t> f(len);
    for (std::size_t i = 0; i < len; ++i) f[i] = static_cast<std::uint8_t>(seed + i * 7);
    return f;
}

void send_all(int fd, const void* p, std::size_t n) {
    auto* b = static_cast<const std::uint8_t*>(p);
    while (n > 0) {
        ssize_t w = ::send(fd, b, n, MSG_NOSIGNAL);
        ASSERT_GT(w, 0) << std::strerror(errno);
        b += w;
        n -= static_cast<std::size_t>(w);
    }
}

void send_frame(int fd, const std::vector<std::uint8_t>& f) {
    const std::uint32_t be = htonl(static_cast<std::uint32_t>(f.size()));
    send_all(fd, &be, 4);
    send_all(fd, f.data(), f.size());
}

bool recv_exact(int fd, void* p, std::size_t n, int ms = 5000) {
    auto* b = static_cast<std::uint8_t*>(p);
    while (n > 0) {
        pollfd pfd{fd, POLLIN, 0};
        if (::poll(&pfd, 1, ms) != 1) return false;
        ssize_t r = ::recv(fd, b, n, 0);
        if (r <= 0) return false;
        b += r;
        n -= static_cast<std::size_t>(r);
    }
    return true;
}

std::vector<std::uint8_t> recv_frame(int fd) {
    std::uint32_t be = 0;
    if (!recv_exact(fd, &be, 4)) return {};
    std::vector<std::uint8_t> f(ntohl(be));
    if (!recv_exact(fd, f.data(), f.size())) return {};
    return f;
}

// A backend of several socketpair streams, one per queue pair (multiqueue
// without a TAP).
class MultiStream final : public NetBackend {
public:
    std::vector<std::unique_ptr<StreamBackend>> q;
    unsigned num_queues() const override { return static_cast<unsigned>(q.size()); }
    bool has_vnet_hdr() const override { return false; }
    NetIoResult read_frame(unsigned i, std::span<std::uint8_t> b) override { return q[i]->read_frame(0, b); }
    IoOp read_op(unsigned i) override { return q[i]->read_op(0); }
    void read_done(unsigned i, int res) override { q[i]->read_done(0, res); }
    NetIoResult write_frame(unsigned i, std::span<const iovec> f) override { return q[i]->write_frame(0, f); }
    bool wants_write(unsigned i) const override { return q[i]->wants_write(0); }
    IoOp write_op(unsigned i, unsigned& slot) override { return q[i]->write_op(0, slot); }
    unsigned write_slots() const override { return 1; }
    NetIo write_done(unsigned i, unsigned slot, int res, unsigned& lost) override {
        return q[i]->write_done(0, slot, res, lost);
    }
    std::string describe() const override { return "multistream"; }
};

// A scripted backend: one pipe per channel (the test writes whole frames,
// vnet header included, into it; closing the write end is the far end
// vanishing: the read returns 0 and the backend reports `closed` with
// `gone_err`, as a deleted TAP or a passt that hung up). It counts the read
// requests the device posts and the channel ioctls it would issue
// (TUNSETQUEUE, TUNSETOFFLOAD), and can hold the loop thread in read_frame,
// inside a receive pass, for `stall_ms` once (a loop that misses
// run_and_wait's timeout).
class ScriptedBackend final : public NetBackend {
public:
    explicit ScriptedBackend(unsigned queues, bool vnet_hdr = true) : vnet_hdr_(vnet_hdr), q_(queues) {
        for (Chan& c : q_) {
            int fds[2];
            EXPECT_EQ(::pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0);
            c.rd = Fd(fds[0]);
            c.wr = Fd(fds[1]);
            c.buf.resize(kMaxPacketLen + 1);
        }
    }
    std::atomic<int> reads{0}, queue_ioctls{0}, offload_ioctls{0};
    std::atomic<int> stall_ms{0};
    std::atomic<bool> stalling{false};
    int gone_err = EBADFD;

    void send(unsigned q, const std::vector<std::uint8_t>& pkt) {
        ASSERT_EQ(::write(q_[q].wr.get(), pkt.data(), pkt.size()), static_cast<ssize_t>(pkt.size()));
    }
    void hang_up(unsigned q) { q_[q].wr.reset(); }

    unsigned num_queues() const override { return static_cast<unsigned>(q_.size()); }
    bool has_vnet_hdr() const override { return vnet_hdr_; }
    NetIoResult read_frame(unsigned q, std::span<std::uint8_t> b) override {
        if (const int ms = stall_ms.exchange(0); ms > 0) {
            stalling = true;
            std::this_thread::sleep_for(std::chrono::milliseconds(ms));
            stalling = false;
        }
        Chan& c = q_[q];
        if (!c.has) return {NetIo::again, 0, 0};
        c.has = false;
        if (c.got.status == NetIo::ok) std::memcpy(b.data(), c.buf.data(), c.got.len);
        return c.got;
    }
    IoOp read_op(unsigned q) override {
        ++reads;
        return {IoOp::Kind::read, q_[q].rd.get(), q_[q].buf.data(), q_[q].buf.size()};
    }
    void read_done(unsigned q, int res) override {
        Chan& c = q_[q];
        if (res == -EAGAIN || res == -EINTR || res == -ECANCELED) return;
        c.has = true;
        c.got = res > 0 ? NetIoResult{NetIo::ok, static_cast<std::size_t>(res), 0} : NetIoResult{NetIo::closed, 0, gone_err};
    }
    NetIoResult write_frame(unsigned, std::span<const iovec> f) override {
        std::size_t n = 0;
        for (const iovec& v : f) n += v.iov_len;
        return {NetIo::ok, n, 0};
    }
    bool wants_write(unsigned) const override { return false; }
    IoOp write_op(unsigned, unsigned& slot) override {
        slot = 0;
        return {};
    }
    unsigned write_slots() const override { return 1; }
    NetIo write_done(unsigned, unsigned, int, unsigned& lost) override {
        lost = 0;
        return NetIo::ok;
    }
    int set_offloads(unsigned) override {
        ++offload_ioctls;
        return 0;
    }
    int set_queue_enabled(unsigned, bool) override {
        ++queue_ioctls;
        return 0;
    }
    std::string describe() const override { return "scripted"; }

private:
    struct Chan {
        Fd rd, wr;
        std::vector<std::uint8_t> buf;
        NetIoResult got;
        bool has = false;
    };
    bool vnet_hdr_;
    std::vector<Chan> q_;
};

class VirtioNetTest : public ::testing::Test {
protected:
    GuestMemory mem{32 << 20, Backing::off};
    fake::Transport tr;
    std::vector<Virtqueue> queues;
    std::vector<std::unique_ptr<fake::Driver>> drv;
    std::vector<Fd> peers;        // far ends, one per queue pair
    std::vector<Fd> notify_fds;   // eventfds, when used
    std::unique_ptr<VirtioNet> dev;   // last: destroyed first

    static constexpr std::uint16_t kSize = 64;

    void TearDown() override { dev.reset(); }

    void create(unsigned pairs = 1) {
        if (pairs == 1) {
            int sv[2];
            ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
            peers.emplace_back(sv[1]);
            dev = std::make_unique<VirtioNet>(std::make_unique<StreamBackend>(Fd(sv[0]), "test"), kMac);
        } else {
            auto b = std::make_unique<MultiStream>();
            for (unsigned i = 0; i < pairs; ++i) {
                int sv[2];
                ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
                peers.emplace_back(sv[1]);
                b->q.push_back(std::make_unique<StreamBackend>(Fd(sv[0]), "test"));
            }
            dev = std::make_unique<VirtioNet>(std::move(b), kMac);
        }
        dev->attach(&tr);
    }

    // A device over a ScriptedBackend of `pairs` channels (owned by the device).
    ScriptedBackend* create_scripted(unsigned pairs, bool vnet_hdr = true) {
        auto b = std::make_unique<ScriptedBackend>(pairs, vnet_hdr);
        ScriptedBackend* raw = b.get();
        dev = std::make_unique<VirtioNet>(std::move(b), kMac);
        dev->attach(&tr);
        return raw;
    }

    // 5.1.4: the status field.
    std::uint16_t link_status() {
        std::uint8_t st[2];
        dev->read_config(6, st);
        return static_cast<std::uint16_t>(st[0] | st[1] << 8);
    }

    // A control command on the last queue; the device's ack.
    std::uint8_t command(const std::vector<std::uint8_t>& cmd) {
        fake::Driver& ctrl = *drv.back();
        const std::uint64_t ack = ctrl.alloc(1, 0xee);
        const std::uint16_t want = static_cast<std::uint16_t>(ctrl.used_idx() + 1);
        ctrl.add_chain({{ctrl.alloc_bytes(cmd), static_cast<std::uint32_t>(cmd.size())}, {ack, 1, true}});
        dev->queue_notify(static_cast<std::uint16_t>(dev->num_queues() - 1));
        EXPECT_TRUE(wait_until([&] { return ctrl.used_idx() == want; }));
        return *mem.read_obj<std::uint8_t>(Gpa(ack));
    }

    // Lays out fresh rings for every queue and activates with `features`.
    void activate(std::uint64_t features, std::uint16_t size = kSize) {
        const std::uint16_t n = dev->num_queues();
        queues.clear();
        queues.reserve(n);
        drv.clear();
        for (std::uint16_t q = 0; q < n; ++q) {
            queues.emplace_back(mem);
            drv.push_back(std::make_unique<fake::Driver>(mem, size, 0x10000ull * (q + 1),
                                                         0x200000ull + 0x400000ull * q));
            queues[q].set_event_idx((features & virtio_bit(VIRTIO_F_EVENT_IDX)) != 0);
            queues[q].set_indirect((features & virtio_bit(VIRTIO_F_INDIRECT_DESC)) != 0);
            ASSERT_TRUE(drv[q]->configure(queues[q])) << queues[q].error().reason;
        }
        tr.features = features | virtio_bit(VIRTIO_F_VERSION_1);
        ASSERT_TRUE(dev->accept_features(tr.features));
        dev->activate(queues, mem);
    }

    void start(std::uint64_t features = 0, unsigned pairs = 1) {
        create(pairs);
        activate(features);
    }

    fake::Driver& rx(unsigned p = 0) { return *drv[2 * p]; }
    fake::Driver& tx(unsigned p = 0) { return *drv[2 * p + 1]; }

    // Posts `count` device-writable buffers of `len` bytes on rx queue of pair p.
    std::vector<std::uint64_t> post_rx(unsigned count, std::uint32_t len, unsigned p = 0) {
        std::vector<std::uint64_t> addrs;
        for (unsigned i = 0; i < count; ++i) {
            addrs.push_back(rx(p).alloc(len, 0xcc));
            rx(p).add_chain({{addrs.back(), len, true}});
        }
        return addrs;
    }

    std::vector<std::uint8_t> read_mem(std::uint64_t gpa, std::size_t len) {
        std::vector<std::uint8_t> v(len);
        EXPECT_TRUE(mem.read(Gpa(gpa), v.data(), len));
        return v;
    }
};

TEST_F(VirtioNetTest, IdentityConfigAndFeatures) {
    create();
    EXPECT_EQ(dev->device_id(), 1);
    EXPECT_EQ(dev->num_queues(), 2);
    EXPECT_EQ(dev->max_queue_size(0), 256);
    EXPECT_EQ(dev->max_queue_size(2), 0);
    const std::uint64_t f = dev->device_features();
    for (unsigned bit : {VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MTU, VIRTIO_NET_F_MRG_RXBUF,
                         VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC})
        EXPECT_TRUE(f & virtio_bit(bit)) << bit;
    // A stream has no vnet header: no offloads; one pair: no MQ/CTRL_VQ.
    for (unsigned bit : {VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MQ,
                         VIRTIO_NET_F_CTRL_VQ})
        EXPECT_FALSE(f & virtio_bit(bit)) << bit;
    ASSERT_EQ(dev->config_size(), 12u);
    std::uint8_t cfg[12];
    dev->read_config(0, cfg);
    EXPECT_EQ(0, std::memcmp(cfg, kMac.data(), 6));
    EXPECT_EQ(cfg[6] | cfg[7] << 8, VIRTIO_NET_S_LINK_UP);
    EXPECT_EQ(cfg[8] | cfg[9] << 8, 1);
    EXPECT_EQ(cfg[10] | cfg[11] << 8, 1500);
    const std::uint8_t junk[2] = {1, 2};
    dev->write_config(0, junk);   // ignored
    dev->read_config(0, std::span(cfg, 2));
    EXPECT_EQ(cfg[0], 0x52);
    // 5.1.3.1 dependencies.
    EXPECT_FALSE(dev->accept_features(virtio_bit(VIRTIO_NET_F_GUEST_TSO4)));
    EXPECT_FALSE(dev->accept_features(virtio_bit(VIRTIO_NET_F_MQ)));
    EXPECT_TRUE(dev->accept_features(virtio_bit(VIRTIO_NET_F_MAC)));
}

TEST_F(VirtioNetTest, TxFrameReachesPeerWithFraming) {
    start(virtio_bit(VIRTIO_F_EVENT_IDX));
    const auto f1 = make_frame(60, 1), f2 = make_frame(1514, 2);
    // Header and frame in separate descriptors; then header+frame in one,
    // the frame split over two.
    tx().add_chain({{tx().alloc(12), 12}, {tx().alloc_bytes(f1), 60}});
    std::vector<std::uint8_t> hf(12, 0);
    hf.insert(hf.end(), f2.begin(), f2.begin() + 1000);
    tx().add_chain({{tx().alloc_bytes(hf), 1012},
                    {tx().alloc_bytes(std::vector<std::uint8_t>(f2.begin() + 1000, f2.end())), 514}});
    dev->queue_notify(1);
    EXPECT_EQ(recv_frame(peers[0].get()), f1);
    EXPECT_EQ(recv_frame(peers[0].get()), f2);
    ASSERT_TRUE(wait_until([&] { return tx().used_idx() == 2; }));
    EXPECT_EQ(tx().used_elem(0).second, 0u);
    ASSERT_TRUE(wait_until([&] { return tr.interrupts(1) >= 1; }));
    const NetCounters c = dev->counters();
    EXPECT_EQ(c.tx_packets, 2u);
    EXPECT_EQ(c.tx_bytes, 60u + 1514u);
    EXPECT_EQ(c.tx_dropped, 0u);
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioNetTest, RxFrameLandsWithZeroHeader) {
    start();
    auto bufs = post_rx(2, 1526);
    dev->queue_notify(0);
    const auto f = make_frame(100, 9);
    send_frame(peers[0].get(), f);
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 1; }));
    EXPECT_EQ(rx().used_elem(0), std::make_pair(0u, 112u));
    const auto got = read_mem(bufs[0], 112);
    VirtioNetHdr hdr;
    std::memcpy(&hdr, got.data(), 12);
    EXPECT_EQ(hdr.flags, 0);
    EXPECT_EQ(hdr.gso_type, VIRTIO_NET_HDR_GSO_NONE);
    EXPECT_EQ(hdr.hdr_len | hdr.gso_size | hdr.csum_start | hdr.csum_offset, 0);
    EXPECT_EQ(hdr.num_buffers, 1);   // 5.1.6.4.1: 1 without MRG_RXBUF
    EXPECT_TRUE(std::equal(f.begin(), f.end(), got.begin() + 12));
    ASSERT_TRUE(wait_until([&] { return tr.interrupts(0) >= 1; }));
    EXPECT_EQ(dev->counters().rx_packets, 1u);
    EXPECT_EQ(dev->counters().rx_bytes, 100u);
}

TEST_F(VirtioNetTest, RxWithoutMergeableDropsFramesTooBigForOneChain) {
    start();
    post_rx(1, 600);
    dev->queue_notify(0);
    send_frame(peers[0].get(), make_frame(1000, 1));   // does not fit: dropped
    const auto small = make_frame(500, 2);
    send_frame(peers[0].get(), small);                 // fits the same buffer
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 1; }));
    EXPECT_EQ(rx().used_elem(0).second, 512u);
    EXPECT_EQ(dev->counters().rx_dropped, 1u);
    EXPECT_EQ(dev->counters().rx_packets, 1u);
}

TEST_F(VirtioNetTest, MergeableRxOf9000BytesAcross2KiBBuffers) {
    start(virtio_bit(VIRTIO_NET_F_MRG_RXBUF) | virtio_bit(VIRTIO_F_EVENT_IDX));
    auto bufs = post_rx(8, 2048);
    dev->queue_notify(0);
    const auto f = make_frame(9000, 3);
    send_frame(peers[0].get(), f);
    // 9012 bytes with the header: 4 full buffers and 820 bytes in a fifth.
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 5; }));
    std::vector<std::uint8_t> all;
    for (std::uint16_t i = 0; i < 5; ++i) {
        auto [id, len] = rx().used_elem(i);
        EXPECT_EQ(id, i);
        EXPECT_EQ(len, i < 4 ? 2048u : 820u);
        auto part = read_mem(bufs[id], len);
        all.insert(all.end(), part.begin(), part.end());
    }
    VirtioNetHdr hdr;
    std::memcpy(&hdr, all.data(), 12);
    EXPECT_EQ(hdr.num_buffers, 5);
    EXPECT_EQ(hdr.flags, 0);
    EXPECT_TRUE(std::equal(f.begin(), f.end(), all.begin() + 12));
    // The remaining 3 buffers take the next frame.
    const auto g = make_frame(3000, 4);
    send_frame(peers[0].get(), g);
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 7; }));
    std::memcpy(&hdr, read_mem(bufs[5], 12).data(), 12);
    EXPECT_EQ(hdr.num_buffers, 2);
    EXPECT_EQ(rx().used_elem(6).second, 3012u - 2048u);
}

TEST_F(VirtioNetTest, NoRxBuffersFramesWaitUntilKickThroughEventfd) {
    create();
    for (std::uint16_t q = 0; q < dev->num_queues(); ++q) notify_fds.emplace_back(::eventfd(0, EFD_CLOEXEC));
    std::vector<int> raw;
    for (const Fd& fd : notify_fds) raw.push_back(fd.get());
    ASSERT_TRUE(dev->take_notify_fds(raw));
    EXPECT_FALSE(dev->take_notify_fds(raw));   // only once
    activate(virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
    std::vector<std::vector<std::uint8_t>> frames;
    for (int i = 0; i < 3; ++i) {
        frames.push_back(make_frame(200 + i, static_cast<std::uint8_t>(i)));
        send_frame(peers[0].get(), frames.back());
    }
    // No buffers: nothing lands, and the loop sleeps (no busy polling).
    rusage before{}, after{};
    ::getrusage(RUSAGE_SELF, &before);
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    ::getrusage(RUSAGE_SELF, &after);
    auto us = [](const rusage& r) {
        return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1000000ll + r.ru_utime.tv_usec + r.ru_stime.tv_usec;
    };
    EXPECT_LT(us(after) - us(before), 50000) << "the loop spins while the guest has no buffers";
    EXPECT_EQ(rx().used_idx(), 0);

    auto bufs = post_rx(4, 1024);
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(notify_fds[0].get(), &one, 8), 8);   // the guest's kick, as KVM would signal it
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 3; }));
    for (std::uint16_t i = 0; i < 3; ++i) {
        auto got = read_mem(bufs[i], 12 + frames[i].size());
        EXPECT_TRUE(std::equal(frames[i].begin(), frames[i].end(), got.begin() + 12)) << i;
        EXPECT_EQ(rx().used_elem(i).second, 12 + frames[i].size());
    }
    // TX kicked through its eventfd too.
    const auto f = make_frame(64, 5);
    tx().add_chain({{tx().alloc(12), 12}, {tx().alloc_bytes(f), 64}});
    ASSERT_EQ(::write(notify_fds[1].get(), &one, 8), 8);
    EXPECT_EQ(recv_frame(peers[0].get()), f);
}

TEST_F(VirtioNetTest, MalformedChainSetsNeedsResetAndLoopSurvives) {
    start();
    // A TX descriptor pointing outside guest RAM.
    tx().add_chain({{mem.size() + 0x1000, 64}});
    dev->queue_notify(1);
    ASSERT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == 1; }));
    // Further kicks and traffic: no more calls, no crash, nothing consumed.
    post_rx(2, 1526);
    dev->queue_notify(1);
    dev->queue_notify(0);
    send_frame(peers[0].get(), make_frame(80, 1));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(tr.needs_reset_calls.load(), 1);
    EXPECT_EQ(rx().used_idx(), 0);
    // Reset, fresh rings: the device works again and delivers the frame.
    dev->reset();
    activate(0);
    auto bufs = post_rx(1, 1526);
    dev->queue_notify(0);
    ASSERT_TRUE(wait_until([&] { return rx().used_idx() == 1; }));
    EXPECT_EQ(rx().used_elem(0).second, 92u);
}

TEST_F(VirtioNetTest, OversizedOrHeaderlessTxFrameNeedsReset) {
    start();
    // 12 + 65551 bytes > 65562.
    tx().add_chain({{tx().alloc(12), 12}, {tx().alloc(65551), 65551}});
    dev->queue_notify(1);
    ASSERT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == 1; }));
    dev->reset();
    activate(0);
    tx().add_chain({{tx().alloc(8), 8}});   // shorter than the header
    dev->queue_notify(1);
    ASSERT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == 2; }));
    dev->reset();
    activate(0);
    // The largest legal frame passes.
    const auto f = make_frame(kMaxFrameLen, 6);
    tx().add_chain({{tx().alloc(12), 12}, {tx().alloc_bytes(f), static_cast<std::uint32_t>(f.size())}});
    dev->queue_notify(1);
    EXPECT_EQ(recv_frame(peers[0].get()), f);
    EXPECT_EQ(tr.needs_reset_calls.load(), 2);
}

TEST_F(VirtioNetTest, ResetWhileTrafficFlows) {
    start(virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
    std::atomic<bool> stop{false};
    const int peer = peers[0].get();
    std::thread sender([&] {
        const auto f = make_frame(700, 1);
        const std::uint32_t be = htonl(700);
        std::vector<std::uint8_t> wire(4);
        std::memcpy(wire.data(), &be, 4);
        wire.insert(wire.end(), f.begin(), f.end());
        while (!stop.load()) {
            pollfd pfd{peer, POLLOUT, 0};
            if (::poll(&pfd, 1, 10) == 1) ::send(peer, wire.data(), wire.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        }
    });
    std::thread drainer([&] {
        std::vector<std::uint8_t> b(65536);
        while (!stop.load()) {
            pollfd pfd{peer, POLLIN, 0};
            if (::poll(&pfd, 1, 10) == 1) (void)::recv(peer, b.data(), b.size(), MSG_DONTWAIT);
        }
    });
    for (int round = 0; round < 20; ++round) {
        post_rx(32, 2048);
        for (int i = 0; i < 16; ++i) tx().add_chain({{tx().alloc(12), 12}, {tx().alloc(300, 1), 300}});
        dev->queue_notify(0);
        dev->queue_notify(1);
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
        dev->reset();
        // After reset() returns the device must not touch the rings.
        const std::uint16_t rx_used = rx().used_idx(), tx_used = tx().used_idx();
        std::this_thread::sleep_for(std::chrono::milliseconds(3));
        EXPECT_EQ(rx().used_idx(), rx_used);
        EXPECT_EQ(tx().used_idx(), tx_used);
        activate(virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
    }
    post_rx(8, 2048);
    dev->queue_notify(0);
    EXPECT_TRUE(wait_until([&] { return rx().used_idx() > 0; }));
    stop = true;
    sender.join();
    drainer.join();
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
    EXPECT_GT(dev->counters().rx_packets, 0u);
    EXPECT_GT(dev->counters().tx_packets, 0u);
}

TEST_F(VirtioNetTest, ResetAnswersWhileGuestRepublishesATinyRxBufferForever) {
    // Mergeable RX with a frame waiting and a 4-byte buffer (shorter than
    // the header: given back unused) republished as fast as the device
    // returns it: every chain counts against the pass's budget, so the loop
    // still answers reset() at once. The buffer is a chain of 256
    // descriptors (all but one empty) on 256-entry rings, so that
    // validating it costs the device far more than republishing it costs
    // the guest, which therefore stays ahead.
    constexpr std::uint16_t kBig = VirtioNet::kQueueSize;
    create();
    activate(virtio_bit(VIRTIO_NET_F_MRG_RXBUF), kBig);
    send_frame(peers[0].get(), make_frame(100, 1));
    std::vector<Buf> tiny(kBig, Buf{rx().alloc(4), 0, true});
    tiny.back().len = 4;
    const std::uint16_t head = rx().add_chain(tiny);
    dev->queue_notify(0);
    std::atomic<bool> stop{false};
    std::atomic<std::uint64_t> published{0};
    std::thread feeder([&] {
        while (!stop.load()) {
            if (static_cast<std::uint16_t>(rx().avail_idx() - rx().used_idx()) < kBig) {
                rx().publish(head);
                ++published;
                // 2.7.7.1: kick only when the device asks for it, as Linux does.
                if ((rx().used_flags() & kVirtqUsedFNoNotify) == 0) dev->queue_notify(0);
            }
        }
    });
    ASSERT_TRUE(wait_until([&] { return published.load() > 10 * kBig; }));   // the device keeps consuming
    const auto took = fake::Stopwatch::time([&] { dev->reset(); });
    stop = true;
    feeder.join();
    EXPECT_LT(took.count(), 100) << "reset() waited " << took.count() << " ms";
    EXPECT_EQ(dev->counters().rx_packets, 0u);
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioNetTest, TxBackpressureHoldsFramesAndKeepsTheirOrder) {
    // The peer reads nothing at first: the socket and the backend's output
    // queue (kStreamMaxQueued) fill up, the backend refuses a frame and the
    // device holds that chain until a write completes. Every frame still
    // arrives, once, in order.
    start();
    constexpr int kFrames = 1200;
    constexpr std::uint32_t kLen = 1500;
    std::thread guest([&] {
        for (int i = 0; i < kFrames; ++i) {
            ASSERT_TRUE(wait_until([&] { return static_cast<std::uint16_t>(tx().avail_idx() - tx().used_idx()) < kSize; }));
            auto f = make_frame(kLen, static_cast<std::uint8_t>(i));
            std::memcpy(f.data(), &i, sizeof i);
            std::vector<std::uint8_t> hf(12, 0);
            hf.insert(hf.end(), f.begin(), f.end());
            tx().add_chain({{tx().alloc_bytes(hf), kLen + 12}});
            dev->queue_notify(1);
        }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    for (int i = 0; i < kFrames; ++i) {
        const auto f = recv_frame(peers[0].get());
        ASSERT_EQ(f.size(), kLen) << i;
        int seq = -1;
        std::memcpy(&seq, f.data(), sizeof seq);
        ASSERT_EQ(seq, i);
    }
    guest.join();
    ASSERT_TRUE(wait_until([&] { return dev->counters().tx_packets == kFrames; }));
    EXPECT_EQ(dev->counters().tx_dropped, 0u);
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioNetTest, PeerHangupDropsTxAndKeepsGoing) {
    start();
    peers[0].reset();
    for (int i = 0; i < 3; ++i) tx().add_chain({{tx().alloc(12), 12}, {tx().alloc(100), 100}});
    dev->queue_notify(1);
    ASSERT_TRUE(wait_until([&] { return tx().used_idx() == 3; }));
    // Frames are used once the backend took them; a SEND that fails later
    // counts them dropped then.
    EXPECT_TRUE(wait_until([&] { return dev->counters().tx_dropped >= 2; }))   // the first send may still succeed
        << dev->counters().tx_dropped;
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioNetTest, MultiqueueControlSetsPairs) {
    const std::uint64_t features = virtio_bit(VIRTIO_NET_F_MQ) | virtio_bit(VIRTIO_NET_F_CTRL_VQ);
    start(features, 2);
    ASSERT_EQ(dev->num_queues(), 5);
    EXPECT_TRUE(dev->device_features() & virtio_bit(VIRTIO_NET_F_MQ));
    std::uint8_t cfg[2];
    dev->read_config(8, cfg);
    EXPECT_EQ(cfg[0], 2);
    fake::Driver& ctrl = *drv[4];
    post_rx(2, 1526, 1);
    dev->queue_notify(2);
    // Pair 1 is off until VQ_PAIRS_SET: its frame waits.
    send_frame(peers[1].get(), make_frame(90, 1));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(rx(1).used_idx(), 0);

    auto command = [&](std::vector<std::uint8_t> cmd) {
        const std::uint64_t ack = ctrl.alloc(1, 0xee);
        const std::uint16_t want = static_cast<std::uint16_t>(ctrl.used_idx() + 1);
        ctrl.add_chain({{ctrl.alloc_bytes(cmd), static_cast<std::uint32_t>(cmd.size())}, {ack, 1, true}});
        dev->queue_notify(4);
        EXPECT_TRUE(wait_until([&] { return ctrl.used_idx() == want; }));
        return *mem.read_obj<std::uint8_t>(Gpa(ack));
    };
    EXPECT_EQ(command({VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 3, 0}), VIRTIO_NET_ERR);   // > max
    EXPECT_EQ(command({VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 0, 0}), VIRTIO_NET_ERR);   // 0
    EXPECT_EQ(command({0 /* CTRL_RX */, 0, 1}), VIRTIO_NET_ERR);
    EXPECT_EQ(command({VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 2, 0}), VIRTIO_NET_OK);
    ASSERT_TRUE(wait_until([&] { return rx(1).used_idx() == 1; }));
    EXPECT_EQ(rx(1).used_elem(0).second, 102u);
    // TX on pair 1 goes to its own stream.
    const auto f = make_frame(70, 2);
    tx(1).add_chain({{tx(1).alloc(12), 12}, {tx(1).alloc_bytes(f), 70}});
    dev->queue_notify(3);
    EXPECT_EQ(recv_frame(peers[1].get()), f);
    // A command without a writable ack byte is malformed.
    ctrl.add_chain({{ctrl.alloc(2), 2}});
    dev->queue_notify(4);
    EXPECT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == 1; }));
}

// stderr (fd 2) into a temporary file while the object lives: the log
// lines a test provoked.
class StderrCapture {
public:
    StderrCapture() {
        char path[] = "/tmp/kguest-stderr.XXXXXX";
        fd_ = ::mkstemp(path);
        ::unlink(path);
        std::fflush(stderr);
        saved_ = ::dup(STDERR_FILENO);
        ::dup2(fd_, STDERR_FILENO);
    }
    ~StderrCapture() { restore(); }
    // Restores stderr and returns what was written to it.
    std::string restore() {
        if (saved_ >= 0) {
            ::dup2(saved_, STDERR_FILENO);
            ::close(saved_);
            saved_ = -1;
        }
        std::string text;
        char buf[4096];
        for (off_t off = 0;;) {
            ssize_t n = ::pread(fd_, buf, sizeof buf, off);
            if (n <= 0) break;
            text.append(buf, static_cast<std::size_t>(n));
            off += n;
        }
        return text;
    }

private:
    int fd_ = -1, saved_ = -1;
};

// A guest looping reset -> DRIVER_OK -> broken ring -> kick must not get a
// log line per cycle: guest-triggered lines go through the rate limiter.
TEST_F(VirtioNetTest, BrokenRingLoopDoesNotFloodTheLog) {
    create();
    StderrCapture capture;
    const auto t0 = std::chrono::steady_clock::now();
    constexpr int kCycles = 1000;
    for (int i = 0; i < kCycles; ++i) {
        dev->reset();
        activate(0);
        tx().add_chain({{mem.size() + 0x1000, 64}});   // outside guest RAM
        dev->queue_notify(1);
        ASSERT_TRUE(wait_until([&] { return tr.needs_reset_calls.load() == i + 1; })) << "cycle " << i;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string log = capture.restore();
    std::size_t lines = 0;
    for (std::size_t pos = 0; (pos = log.find("kguest: ", pos)) != std::string::npos; ++pos) ++lines;
    // The limiter lets 5 lines a second through, plus one "suppressed" note.
    const double bound = 2 * 5 * (secs + 2);
    EXPECT_LT(static_cast<double>(lines), bound) << lines << " log lines in " << secs << " s for " << kCycles
                                                 << " cycles; the first: " << log.substr(0, 300);
    EXPECT_GT(lines, 0u);   // the first broken ring is still reported
}

TEST_F(VirtioNetTest, VanishedBackendTakesTheLinkDownOnceAndGoesIdle) {
    // The far end vanishes (a deleted TAP reads EBADFD, a passt that went
    // away EOF): the device clears VIRTIO_NET_S_LINK_UP (5.1.4), sends a
    // configuration change notification (2.5.1), logs one line, and asks the
    // backend for nothing more, whatever the guest kicks or resets.
    ScriptedBackend* b = create_scripted(1);
    ASSERT_TRUE(dev->device_features() & virtio_bit(VIRTIO_NET_F_STATUS));
    activate(virtio_bit(VIRTIO_NET_F_STATUS) | virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
    post_rx(8, 1526);
    dev->queue_notify(0);
    ASSERT_TRUE(wait_until([&] { return b->reads.load() >= 1; }));
    EXPECT_EQ(link_status(), VIRTIO_NET_S_LINK_UP);
    const int configs = tr.config_calls.load();

    ::testing::internal::CaptureStderr();
    b->hang_up(0);
    const bool down = wait_until([&] { return link_status() == 0; }, 2000);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const int reads = b->reads.load();
    for (int i = 0; i < 20; ++i) {   // the guest keeps kicking, sends, and resets once
        tx().add_chain({{tx().alloc(12), 12}, {tx().alloc(60), 60}});
        dev->queue_notify(1);
        dev->queue_notify(0);
        if (i == 10) {
            dev->reset();
            activate(virtio_bit(VIRTIO_NET_F_STATUS) | virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
            post_rx(8, 1526);
        }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    const std::string log = ::testing::internal::GetCapturedStderr();

    EXPECT_TRUE(down) << "the link stays up after the backend went away";
    EXPECT_EQ(link_status(), 0) << "a reset brought the link back up";
    EXPECT_EQ(b->reads.load(), reads) << "the device keeps reading from a backend that is gone";
    EXPECT_EQ(tr.config_calls.load(), configs + 1);
    EXPECT_EQ(std::count(log.begin(), log.end(), '\n'), 1) << log;
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
    EXPECT_TRUE(wait_until([&] { return tx().used_idx() == 9; }));   // TX still completes (dropped)
}

TEST_F(VirtioNetTest, PairChangesReachTheBackendOnlyOnChangeAndAtABoundedRate) {
    // TUNSETQUEUE and TUNSETOFFLOAD take rtnl on the host: a guest must not
    // be able to issue them at will. 256 alternating VQ_PAIRS_SET commands
    // cause at most the changes' worth of TUNSETQUEUE, and the changes
    // themselves are limited to about 10 a second (a burst of 10 first);
    // a command that changes nothing, and resets with the same features,
    // issue none at all.
    ScriptedBackend* b = create_scripted(2);
    const std::uint64_t features = virtio_bit(VIRTIO_NET_F_MQ) | virtio_bit(VIRTIO_NET_F_CTRL_VQ) |
                                   virtio_bit(VIRTIO_NET_F_CSUM) | virtio_bit(VIRTIO_NET_F_GUEST_CSUM);
    activate(features);   // its work is done on the loop when it returns
    // The TAP attached every channel; activation detaches pair 1 and sets
    // the offloads once.
    EXPECT_EQ(b->queue_ioctls.load(), 1);
    EXPECT_EQ(b->offload_ioctls.load(), 1);

    const int q0 = b->queue_ioctls.load();
    fake::Stopwatch sw;
    int changes = 0;   // commands answered OK that asked for another count
    std::uint16_t pairs = 1;
    for (int i = 0; i < 256; ++i) {
        const std::uint8_t n = i % 2 == 0 ? 2 : 1;
        const std::uint8_t ack = command({VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, n, 0});
        EXPECT_TRUE(ack == VIRTIO_NET_OK || ack == VIRTIO_NET_ERR) << int(ack);
        if (ack == VIRTIO_NET_OK) {
            changes += n != pairs;
            pairs = n;
        }
    }
    const double secs = static_cast<double>(sw.elapsed().count()) / 1000.0;
    const int ioctls = b->queue_ioctls.load() - q0;
    EXPECT_EQ(ioctls, changes) << "each accepted change moves pair 1 only";
    EXPECT_GE(changes, 1);
    EXPECT_LE(ioctls, 10 + 10 * secs + 1) << changes << " changes in " << secs << " s";

    // The count in force again: answered OK, nothing issued.
    const int q1 = b->queue_ioctls.load();
    for (int i = 0; i < 50; ++i)
        EXPECT_EQ(command({VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, static_cast<std::uint8_t>(pairs), 0}),
                  VIRTIO_NET_OK);
    EXPECT_EQ(b->queue_ioctls.load(), q1);

    // Resets and activations with the same features: the offloads stay, and
    // pairs fall back to 1 at most once.
    const int o2 = b->offload_ioctls.load(), q2 = b->queue_ioctls.load();
    for (int i = 0; i < 20; ++i) {
        dev->reset();
        activate(features);
    }
    EXPECT_EQ(b->offload_ioctls.load(), o2);
    EXPECT_LE(b->queue_ioctls.load() - q2, 1);
    EXPECT_EQ(tr.needs_reset_calls.load(), 0);
}

TEST_F(VirtioNetTest, ResetThatTimesOutLeavesTheQueuesAlone) {
    // The loop is held up inside a receive pass (here 3 s in the backend)
    // past run_and_wait's 2 s timeout. reset() still returns, and once it
    // has, the device must not touch the rings the transport is about to
    // reset: the frame the stalled pass got lands nowhere.
    ScriptedBackend* b = create_scripted(1);
    activate(virtio_bit(VIRTIO_NET_F_MRG_RXBUF));
    ASSERT_TRUE(wait_until([&] { return b->reads.load() >= 1; }));
    post_rx(4, 1526);   // available; the pass finds them without a kick
    b->stall_ms = 3000;
    std::vector<std::uint8_t> pkt(12, 0);
    const auto f = make_frame(100, 9);
    pkt.insert(pkt.end(), f.begin(), f.end());
    b->send(0, pkt);
    ASSERT_TRUE(wait_until([&] { return b->stalling.load(); }));
    const auto took = fake::Stopwatch::time([&] { dev->reset(); });
    const std::uint16_t used = rx().used_idx();
    ASSERT_TRUE(wait_until([&] { return !b->stalling.load(); }));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));   // what the pass would do next
    EXPECT_LT(took.count(), 2600) << "reset() waited " << took.count() << " ms";
    EXPECT_EQ(rx().used_idx(), used) << "the device used a buffer after reset() returned";
    EXPECT_EQ(dev->counters().rx_packets, 0u);
}

TEST_F(VirtioNetTest, NoQueueWorkWithoutDma) {
    // Bus mastering off (dma_enabled() false): a received frame and a TX
    // chain wait, even on kicks that bypass the transport (ioeventfds).
    // Once DMA is back the transport kicks every queue and both go.
    create();
    tr.dma = false;
    activate(0);
    post_rx(2, 1526);
    const auto in = make_frame(100, 3), out = make_frame(64, 4);
    send_frame(peers[0].get(), in);
    tx().add_chain({{tx().alloc(12), 12}, {tx().alloc_bytes(out), 64}});
    dev->queue_notify(0);
    dev->queue_notify(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_EQ(rx().used_idx(), 0);
    EXPECT_EQ(tx().used_idx(), 0);
    pollfd pfd{peers[0].get(), POLLIN, 0};
    EXPECT_EQ(::poll(&pfd, 1, 0), 0) << "a frame left with DMA off";
    tr.dma = true;
    for (std::uint16_t q = 0; q < dev->num_queues(); ++q) dev->queue_notify(q);   // as virtio-pci does
    EXPECT_EQ(recv_frame(peers[0].get()), out);
    EXPECT_TRUE(wait_until([&] { return rx().used_idx() == 1 && tx().used_idx() == 1; }));
    EXPECT_EQ(rx().used_elem(0).second, 12 + in.size());
}

TEST(VirtioNetSetup, RejectsNullBackend) {
    EXPECT_THROW(VirtioNet(nullptr, kMac), std::invalid_argument);
}

TEST(VirtioNetSetup, DestroyWithoutActivateAndAfterReset) {
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    Fd peer(sv[1]);
    {
        VirtioNet dev(std::make_unique<StreamBackend>(Fd(sv[0])), kMac);
        dev.reset();   // as at probe
        dev.queue_notify(0);
        dev.queue_notify(7);   // out of range: ignored
    }
    SUCCEED();
}

} // namespace
} // namespace kguest
