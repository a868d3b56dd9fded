// `kguest` command-line handling: every bad flag, unreadable or malformed
// image and too-small memory gives one clear line on stderr and exit status 2
// before /dev/kvm is even opened (so these run without KVM).
#include "tests/support/process.hpp"

#include <algorithm>
#include <cstdio>
#include <fcntl.h>
#include <unistd.h>
#include <fstream>
#include <iterator>
#include <gtest/gtest.h>

namespace kguest {
namespace {

using test::kGuestElf;
using test::kKguest;
using test::run_process;

void expect_usage_error(const std::vector<std::string>& args, const std::string& needle) {
    std::vector<std::string> argv = {kKguest};
    argv.insert(argv.end(), args.begin(), args.end());
    auto r = run_process(argv, 30);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.status, 2) << joined << "\n" << r.err;
    EXPECT_NE(r.err.find(needle), std::string::npos) << joined << "\nstderr: " << r.err;
    // One line, prefixed like every kguest message.
    EXPECT_EQ(r.err.rfind("kguest: ", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(Cli, BadFlags) {
    expect_usage_error({}, "no command given");
    expect_usage_error({"frobnicate"}, "unknown command");
    expect_usage_error({"run"}, "--kernel PATH is required");
    expect_usage_error({"run", "--kernel", kGuestElf, "--bogus"}, "unknown option '--bogus'");
    expect_usage_error({"run", "--kernel"}, "--kernel needs a value");
    expect_usage_error({"run", "--kernel", kGuestElf, "--cpus", "0"}, "--cpus '0'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--cpus", "2x"}, "--cpus '2x'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--cpus=999"}, "--cpus '999'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory", "lots"}, "--memory 'lots'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory", "4M"}, "too little memory");
    expect_usage_error({"run", "--kernel", kGuestElf, "--hugepages", "1G"}, "--hugepages '1G'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--no-pv-spinlocks=yes"}, "--no-pv-spinlocks takes no value");
    expect_usage_error({"run", "--kernel", kGuestElf, "--port80", "maybe"}, "--port80 'maybe'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--name", "a/b"}, "--name 'a/b'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--balloon=free_page_reporting"}, "--balloon 'free_page_reporting'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--balloon=stats=on,bogus=off"}, "--balloon 'bogus': unknown option");
    expect_usage_error({"run", "--kernel", kGuestElf, "--cmdline", std::string(5000, 'x')}, "--cmdline is longer");
}

TEST(Cli, MemoryMaxAndResize) {
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory-max", "lots"}, "--memory-max 'lots'");
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory", "1G", "--memory-max", "1025K"}, "not a multiple of 2M");
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory", "1G", "--memory-max", "512M"}, "is below --memory");
    expect_usage_error({"run", "--kernel", kGuestElf, "--memory-max", "4G", "--hugepages", "hugetlbfs"},
                       "--memory-max needs --hugepages thp or off");
    expect_usage_error({"resize", "vm1"}, "--memory SIZE is required");
    expect_usage_error({"resize", "--memory", "1G"}, "need a VM NAME");
    expect_usage_error({"resize", "vm1", "--memory", "lots"}, "--memory 'lots'");
    expect_usage_error({"resize", "vm1", "--memory", "1G", "--timeout", "5"}, "--timeout only makes sense with --wait");
    expect_usage_error({"resize", "vm1", "--target", "1G"}, "unknown option '--target'");
}

TEST(Cli, BadImages) {
    expect_usage_error({"run", "--kernel", "/nonexistent/guest.elf"}, "cannot open /nonexistent/guest.elf");
    expect_usage_error({"run", "--kernel", "/tmp"}, "not a regular file");
    expect_usage_error({"run", "--kernel", KGUEST_SOURCE_DIR "/README.md"}, "neither a PVH ELF file nor a bzImage");
    expect_usage_error({"run", "--kernel", kKguest}, "kernel image:");  // a host ELF, not a PVH kernel
    expect_usage_error({"run", "--kernel", "/dev/null"}, "not a regular file");
}

// Malformed Linux kernels, made from the installed Debian bzImage (CI
// installs linux-image-amd64 for the sandbox): each is one clear line.
TEST(Cli, MalformedBzImages) {
    const std::string vmlinuz = "/vmlinuz";
    std::ifstream in(vmlinuz, std::ios::binary);
    if (!in) GTEST_SKIP() << "no /vmlinuz on this host (apt-get install linux-image-amd64)";
    std::vector<char> image((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    ASSERT_GT(image.size(), 0x1000u);
    auto write = [](const std::string& path, const std::vector<char>& bytes) {
        std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        return path;
    };
    std::vector<char> img(image.begin(), image.begin() + static_cast<long>(image.size() / 2));
    expect_usage_error({"run", "--kernel", write("/tmp/kguest-cli-truncated", img)}, "bzImage truncated");
    img = image;
    img[0x202] = 'X';  // "HdrS" magic
    expect_usage_error({"run", "--kernel", write("/tmp/kguest-cli-magic", img)}, "neither a PVH ELF file nor a bzImage");
    img = image;
    img[0x206] = 0x01;  // protocol 2.01
    img[0x207] = 0x02;
    expect_usage_error({"run", "--kernel", write("/tmp/kguest-cli-version", img)}, "boot protocol 2.1 is too old");
    std::vector<char> initrd(80u << 20, 'x');
    expect_usage_error({"run", "--kernel", vmlinuz, "--memory", "64M", "--initrd", write("/tmp/kguest-cli-initrd", initrd)},
                       "larger than guest RAM");
    initrd.resize(40u << 20);
    expect_usage_error({"run", "--kernel", vmlinuz, "--memory", "96M", "--initrd", write("/tmp/kguest-cli-initrd", initrd)},
                       "does not fit in guest RAM beside the kernel");
    expect_usage_error({"run", "--kernel", vmlinuz, "--memory", "16M"}, "needs");
    for (const char* f : {"truncated", "magic", "version", "initrd"}) std::remove((std::string("/tmp/kguest-cli-") + f).c_str());
}

// --disk: every bad disk is one line and exit 2 before /dev/kvm is opened.
TEST(VirtioBlkCli, BadDisksAreUsageErrors) {
    const std::string k = kGuestElf;
    auto write = [](const std::string& path, std::size_t size, const std::string& magic) {
        std::string bytes(size, '\0');
        bytes.replace(0, magic.size(), magic);
        std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
        return path;
    };
    expect_usage_error({"run", "--kernel", k, "--disk", "path=/nonexistent/disk.img"}, "cannot open: No such file");
    expect_usage_error({"run", "--kernel", k, "--disk", "path=/tmp"}, "cannot open: Is a directory");
    expect_usage_error({"run", "--kernel", k, "--disk", "path=" + write("/tmp/kguest-cli-disk.qcow2", 4096, "QFI\xfb")},
                       "qemu-img convert -O raw /tmp/kguest-cli-disk.qcow2");
    expect_usage_error({"run", "--kernel", k, "--disk", "path=" + write("/tmp/kguest-cli-disk.odd", 1000, "")},
                       "not a multiple of 512");
    const std::string raw = write("/tmp/kguest-cli-disk.raw", 4096, "");
    expect_usage_error({"run", "--kernel", k, "--disk", "path=" + raw + ",queues=0"}, "queues= wants a number");
    expect_usage_error({"run", "--kernel", k, "--disk", "path=" + raw + ",bogus=1"}, "unknown key 'bogus'");
    expect_usage_error({"run", "--kernel", k, "--disk"}, "--disk needs a value");
    // The image is locked by another open file description (as a running VM holds it).
    const int fd = ::open(raw.c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    struct flock fl {};
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 101;   // QEMU's "holds write permission" byte
    fl.l_len = 1;
    ASSERT_EQ(::fcntl(fd, F_OFD_SETLK, &fl), 0);
    expect_usage_error({"run", "--kernel", k, "--disk", "path=" + raw + ",readonly=on"}, "open for writing");
    ::close(fd);
    for (const char* f : {"qcow2", "odd", "raw"}) std::remove((std::string("/tmp/kguest-cli-disk.") + f).c_str());
}

TEST(Cli, VersionAndHelp) {
    auto r = run_process({kKguest, "--version"}, 10);
    EXPECT_EQ(r.status, 0);
    EXPECT_EQ(r.out.rfind("kguest ", 0), 0u) << r.out;
    r = run_process({kKguest, "--help"}, 10);
    EXPECT_EQ(r.status, 0);
    EXPECT_NE(r.out.find("--hugepages"), std::string::npos);
}

} // namespace
} // namespace kguest

namespace kguest {
namespace {

// `kguest ... | head`: once the reader is gone a write gets SIGPIPE, whose
// default action ends the process without a word (or, for a VM, without its
// summary and clean-up). kguest ignores SIGPIPE and treats the write as failed.
TEST(Cli, StdoutToAClosedPipeIsNoDeathBySignal) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    ::close(p[0]);   // nobody will ever read
    char err_path[] = "/tmp/kguest-cli-err.XXXXXX";
    const int err_fd = ::mkstemp(err_path);
    ASSERT_GE(err_fd, 0);
    ::unlink(err_path);
    for (const char* arg : {"--help", "--version"}) {
        const pid_t pid = test::spawn({kKguest, arg}, p[1], err_fd);
        int ws = 0;
        ASSERT_EQ(::waitpid(pid, &ws, 0), pid);
        EXPECT_FALSE(WIFSIGNALED(ws)) << arg << ": killed by signal " << (WIFSIGNALED(ws) ? WTERMSIG(ws) : 0);
    }
    ::close(p[1]);
    ::close(err_fd);
}

} // namespace
} // namespace kguest
