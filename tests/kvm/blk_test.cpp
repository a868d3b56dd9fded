// The block path end to end: the small guest's virtio-blk driver (guest/blk.cpp)
// behind kguest's virtio-blk-pci (--disk) and, unchanged, behind QEMU's
// virtio-blk-pci. Checked here:
// - test=blk: the guest writes a pattern over the whole disk, FLUSHes, reads
//   it back and checks it; the host then checks the image file itself, so a
//   device that answered reads from somewhere else would still fail;
// - readonly=on: the guest's write gets VIRTIO_BLK_S_IOERR, the image keeps
//   every byte;
// - crash consistency: kguest SIGKILLed at a random moment while test=blk-log
//   writes records, each followed by a FLUSH; every record the guest saw
//   flushed must be in the image;
// - a second kguest opening the same image for writing exits 2 with one line.
// Images live in /tmp (a tmpfs in the sandbox), so cache=writeback (kguest's
// default) everywhere; the benchmark (scripts/blk-bench) measures cache=none.
#include "tests/support/kvm_env.hpp"
#include "tests/support/process.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace kguest {
namespace {
using namespace kguest::test;

constexpr std::size_t kSector = 512;

// A temporary disk image holding `content`, removed at the end.
class Image {
public:
    explicit Image(const std::vector<unsigned char>& content) {
        char path[] = "/tmp/kguest-blk-test.XXXXXX";
        int fd = mkstemp(path);
        path_ = path;
        ok_ = fd >= 0 && ::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size());
        if (fd >= 0) ::close(fd);
    }
    explicit Image(std::size_t zero_bytes) : Image(std::vector<unsigned char>(zero_bytes)) {}
    ~Image() { unlink(path_.c_str()); }
    Image(const Image&) = delete;
    Image& operator=(const Image&) = delete;
    bool ok() const { return ok_; }
    const std::string& path() const { return path_; }
    std::vector<unsigned char> read() const {
        std::ifstream f(path_, std::ios::binary);
        return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
    }

private:
    std::string path_;
    bool ok_ = false;
};

// guest/blk.cpp's fill_sector(): what test=blk writes into sector `sector`.
void fill_sector(std::uint64_t* p, std::uint64_t sector, std::uint64_t seed) {
    p[0] = sector;
    p[1] = seed;
    std::uint64_t x = sector * 0x9e3779b97f4a7c15ull ^ seed;
    for (std::size_t i = 2; i < kSector / 8; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        p[i] = x ^ (x >> 29);
    }
}

// Sectors of `img` that do not hold test=blk's pattern for `seed`.
std::size_t bad_pattern_sectors(const std::vector<unsigned char>& img, std::uint64_t seed, std::string& first) {
    std::size_t bad = 0;
    std::uint64_t want[kSector / 8];
    for (std::size_t s = 0; s < img.size() / kSector; ++s) {
        fill_sector(want, s, seed);
        if (std::memcmp(img.data() + s * kSector, want, kSector) == 0) continue;
        if (bad++ == 0) first = "sector " + std::to_string(s);
    }
    return bad;
}

// guest/blk.cpp's blk-log record n: "KGBLKLOG", n, seed, and a FNV-1a
// checksum of the first 63 words in the last.
bool record_ok(const unsigned char* sector, std::uint64_t n, std::uint64_t seed) {
    std::uint64_t w[kSector / 8];
    std::memcpy(w, sector, kSector);
    if (w[0] != 0x474f4c4b4c42474bull || w[1] != n || w[2] != seed) return false;
    std::uint64_t sum = 0xcbf29ce484222325ull;
    for (std::size_t i = 0; i < kSector / 8 - 1; ++i) sum = (sum ^ w[i]) * 0x100000001b3ull;
    return w[kSector / 8 - 1] == sum;
}

std::vector<std::string> qemu_blk(const std::string& cmdline, const std::string& drive, const std::string& device) {
    // isa-debug-exit turns the guest's status S into (S << 1) | 1.
    return {"qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-nodefaults",
            "-no-user-config", "-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", kGuestElf, "-append", cmdline, "-drive", drive, "-device", device};
}

TEST(KvmBlk, PatternWriteFlushReadBackAndSerial) {
    KGUEST_OPEN_KVM(kvm);
    Image img(16 << 20);
    ASSERT_TRUE(img.ok());
    auto r = run_process(kguest_run("test=blk blk.seed=4242", 1,
                                    {"--console", "stdio", "--disk", "path=" + img.path() + ",serial=kgblk-01"}), 300);
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    auto init = results(r.out, "blk-init");
    ASSERT_EQ(init.size(), 1u) << r.out;
    EXPECT_EQ(init[0]["capacity"], std::to_string((16 << 20) / kSector));
    EXPECT_EQ(init[0]["flush"], "1");
    EXPECT_EQ(init[0]["msix"], "1");
    auto blk = results(r.out, "blk");
    ASSERT_EQ(blk.size(), 1u) << r.out;
    EXPECT_EQ(blk[0]["ok"], "1");
    EXPECT_EQ(blk[0]["checked"], std::to_string((16 << 20) / kSector));
    EXPECT_EQ(blk[0]["errors"], "0");
    EXPECT_EQ(blk[0]["flush"], "ok");
    EXPECT_EQ(blk[0]["serial"], "kgblk-01");
    std::string first;
    EXPECT_EQ(bad_pattern_sectors(img.read(), 4242, first), 0u) << "first: " << first;
}

TEST(KvmBlk, SameGuestOnQemuVirtioBlkPci) {
    KGUEST_OPEN_KVM(kvm);
    Image img(8 << 20);
    ASSERT_TRUE(img.ok());
    auto r = run_process(qemu_blk("test=blk blk.seed=77", "if=none,id=d0,format=raw,file=" + img.path(),
                                  "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qemu-blk-7"), 300);
    ASSERT_EQ(r.status, 1) << r.out << r.err;
    auto blk = results(r.out, "blk");
    ASSERT_EQ(blk.size(), 1u) << r.out;
    EXPECT_EQ(blk[0]["ok"], "1");
    EXPECT_EQ(blk[0]["checked"], std::to_string((8 << 20) / kSector));
    EXPECT_EQ(blk[0]["serial"], "qemu-blk-7");
    std::string first;
    EXPECT_EQ(bad_pattern_sectors(img.read(), 77, first), 0u) << "first: " << first;
}

TEST(KvmBlk, ReadOnlyWriteGetsIoerrAndImageUnchanged) {
    KGUEST_OPEN_KVM(kvm);
    std::vector<unsigned char> content(4 << 20);
    std::mt19937_64 rng(12345);
    for (auto& b : content) b = static_cast<unsigned char>(rng());
    Image img(content);
    ASSERT_TRUE(img.ok());
    auto r = run_process(kguest_run("test=blk", 1, {"--console", "stdio", "--disk", "path=" + img.path() + ",readonly=on"}),
                         300);
    ASSERT_EQ(r.status, 0) << r.out << r.err;
    auto init = results(r.out, "blk-init");
    ASSERT_EQ(init.size(), 1u) << r.out;
    EXPECT_EQ(init[0]["ro"], "1");
    auto blk = results(r.out, "blk");
    ASSERT_EQ(blk.size(), 1u) << r.out;
    EXPECT_EQ(blk[0]["ro"], "1");
    EXPECT_EQ(blk[0]["write_status"], "ioerr");
    EXPECT_EQ(blk[0]["read_errors"], "0");
    EXPECT_EQ(blk[0]["sectors"], std::to_string(content.size() / kSector));
    EXPECT_TRUE(img.read() == content) << "the read-only image changed";
}

// "RECORD n" lines: the highest n, after checking they count up from 0
// (-1 when there are none).
long long last_record(const std::string& out, std::string& why) {
    long long last = -1;
    std::size_t pos = 0;
    while ((pos = out.find("RECORD ", pos)) != std::string::npos) {
        pos += 7;
        std::size_t end = out.find('\n', pos);
        if (end == std::string::npos) break;  // a line cut off by the kill
        long long n = std::stoll(out.substr(pos, end - pos));
        if (n != last + 1 && why.empty()) why = "RECORD " + std::to_string(n) + " after " + std::to_string(last);
        last = n;
    }
    return last;
}

TEST(KvmBlk, FlushedRecordsSurviveSigkill) {
    KGUEST_OPEN_KVM(kvm);
    std::mt19937 rng(std::random_device{}());
    for (int run = 0; run < 3; ++run) {
        SCOPED_TRACE("run " + std::to_string(run));
        // 131072 records: more than even real KVM writes before the kill.
        Image img(64 << 20);
        ASSERT_TRUE(img.ok());
        std::uint64_t seed = rng();
        Background vm(kguest_run("test=blk-log blk.seed=" + std::to_string(seed), 1,
                                 {"--console", "stdio", "--disk", "path=" + img.path()}));
        ASSERT_TRUE(vm.wait_for_output("RECORD 0", 120)) << vm.out() << vm.err();
        // A random moment in the next 0.2-2 s, while records are being written.
        std::this_thread::sleep_for(std::chrono::milliseconds(200 + rng() % 1800));
        bool was_running = vm.running();
        kill(vm.pid(), SIGKILL);
        auto r = vm.wait(30);
        EXPECT_TRUE(was_running) << "the guest filled the disk before the kill\n" << r.out;
        std::string why;
        long long last = last_record(r.out, why);
        EXPECT_TRUE(why.empty()) << why;
        ASSERT_GE(last, 0) << r.out << r.err;
        auto data = img.read();
        ASSERT_EQ(data.size(), std::size_t(64 << 20));
        for (long long n = 0; n <= last; ++n)
            ASSERT_TRUE(record_ok(data.data() + n * kSector, std::uint64_t(n), seed))
                << "record " << n << " was reported flushed (last reported: " << last << ") but is not in the image";
        std::cout << "run " << run << ": " << last + 1 << " records flushed before SIGKILL, all in the image\n";
    }
}

TEST(KvmBlk, SecondWriterOfAnImageExitsTwo) {
    KGUEST_OPEN_KVM(kvm);
    Image img(4 << 20);
    ASSERT_TRUE(img.ok());
    // kguest opens and locks its images before the VM exists: a booted
    // guest means the lock is held. This one idles and leaves the disk alone.
    Background first(kguest_run("test=idle idle_ms=120000", 1, {"--console", "stdio", "--disk", "path=" + img.path()}));
    ASSERT_TRUE(first.wait_for_output("RESULT boot", 120)) << first.out() << first.err();
    auto second = run_process(kguest_run("test=blk", 1, {"--console", "stdio", "--disk", "path=" + img.path()}), 60);
    EXPECT_EQ(second.status, 2) << second.out << second.err;
    EXPECT_EQ(std::count(second.err.begin(), second.err.end(), '\n'), 1) << second.err;
    EXPECT_NE(second.err.find(img.path()), std::string::npos) << second.err;
    EXPECT_TRUE(second.out.find("RESULT") == std::string::npos) << "the second VM ran its guest\n" << second.out;
    EXPECT_TRUE(first.running()) << "the first VM ended\n" << first.out() << first.err();
}

}  // namespace
}  // namespace kguest
