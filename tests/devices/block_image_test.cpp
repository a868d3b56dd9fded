// Opening disk images: what is refused with one line (missing, a directory,
// a size not a multiple of 512, qcow2/VMDK/VHD/VHDX headers, a fixed VHD's
// footer), the default serial, and QEMU-compatible OFD locking: two opens in
// this process conflict exactly as two processes would (OFD locks belong to
// the open file description).
#include "devices/block_image.hpp"

#include "devices/base/error.hpp"

#include <cstring>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace kguest {
namespace {

struct Temp {
    std::string path;
    explicit Temp(const std::vector<std::uint8_t>& bytes) {
        char tmpl[] = "/tmp/kguest-img-test-XXXXXX";
        const int fd = ::mkstemp(tmpl);
        EXPECT_GE(fd, 0);
        path = tmpl;
        EXPECT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
        ::close(fd);
    }
    ~Temp() { ::unlink(path.c_str()); }
};

std::vector<std::uint8_t> with_magic(std::size_t size, const std::string& magic, std::size_t at = 0) {
    std::vector<std::uint8_t> v(size, 0);
    std::memcpy(v.data() + at, magic.data(), magic.size());
    return v;
}

DiskConfig disk(const std::string& path, bool readonly = false) {
    DiskConfig c;
    c.path = path;
    c.readonly = readonly;
    return c;
}

std::string usage_error(const DiskConfig& c) {
    try {
        BlockImage img(c);
    } catch (const UsageError& e) {
        return e.what();
    }
    return "";
}

TEST(VirtioBlkImage, OpensARawFile) {
    Temp t(std::vector<std::uint8_t>(64 << 10, 1));
    BlockImage img(disk(t.path));
    EXPECT_EQ(img.size(), 64u << 10);
    EXPECT_EQ(img.block_size(), 512u);
    EXPECT_FALSE(img.readonly());
    EXPECT_FALSE(img.block_device());
    EXPECT_EQ(img.serial(), default_disk_serial(img.path()));
    EXPECT_EQ(img.serial().size(), 20u);
    EXPECT_EQ(img.path().substr(img.path().size() - 20), img.serial());
}

TEST(VirtioBlkImage, RefusesWhatIsNotARawImage) {
    EXPECT_NE(usage_error(disk("/nonexistent/disk.img")).find("cannot open"), std::string::npos);
    EXPECT_NE(usage_error(disk("/tmp", true)).find("not a regular file or a block device"), std::string::npos);
    EXPECT_NE(usage_error(disk("/dev/null", true)).find("not a regular file or a block device"), std::string::npos);
    Temp odd(std::vector<std::uint8_t>(1000, 0));
    EXPECT_NE(usage_error(disk(odd.path)).find("not a multiple of 512"), std::string::npos);
    struct Case {
        std::string magic;
        std::size_t at;
        const char* name;
    } cases[] = {{"QFI\xfb", 0, "qcow2"},   {"KDMV", 0, "VMDK"},     {"# Disk DescriptorFile", 0, "VMDK"},
                 {"conectix", 0, "VHD"},   {"vhdxfile", 0, "VHDX"}, {"conectix", 4096 - 512, "VHD"}};
    for (const Case& c : cases) {
        Temp t(with_magic(4096, c.magic, c.at));
        const std::string err = usage_error(disk(t.path));
        EXPECT_NE(err.find(std::string("a ") + c.name + " image"), std::string::npos) << err;
        EXPECT_NE(err.find("qemu-img convert -O raw " + t.path), std::string::npos) << err;
        EXPECT_EQ(err.find('\n'), std::string::npos);
    }
    // Raw data that merely contains a magic elsewhere is raw.
    Temp fine(with_magic(4096, "QFI\xfb", 100));
    EXPECT_EQ(usage_error(disk(fine.path)), "");
}

TEST(VirtioBlkImage, ForeignFormatProbe) {
    const std::vector<std::uint8_t> q = with_magic(512, "QFI\xfb");
    EXPECT_STREQ(foreign_image_format(q), "qcow2");
    EXPECT_EQ(foreign_image_format(std::vector<std::uint8_t>(512, 0)), nullptr);
    EXPECT_EQ(foreign_image_format(std::span<const std::uint8_t>()), nullptr);
    EXPECT_EQ(default_disk_serial("/a/b"), "/a/b");
    EXPECT_EQ(default_disk_serial("/var/lib/kguest/images/root.img"), "uest/images/root.img");
}

TEST(VirtioBlkImage, OfdLocksLikeQemu) {
    Temp t(std::vector<std::uint8_t>(4096, 0));
    {
        BlockImage writer(disk(t.path));
        // A second writer and a reader both conflict with a writer.
        EXPECT_NE(usage_error(disk(t.path)).find("another process has it open"), std::string::npos);
        EXPECT_NE(usage_error(disk(t.path, true)).find("open for writing"), std::string::npos);
    }
    {
        // Readers share; a writer conflicts with them.
        BlockImage r1(disk(t.path, true));
        BlockImage r2(disk(t.path, true));
        EXPECT_NE(usage_error(disk(t.path)).find("does not share writing"), std::string::npos);
    }
    // All closed: the locks went with the descriptors.
    BlockImage again(disk(t.path));
    EXPECT_EQ(again.size(), 4096u);

    // QEMU's own byte: a process holding 201 (a QEMU reader) blocks a writer.
    Temp u(std::vector<std::uint8_t>(4096, 0));
    const int fd = ::open(u.path.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    struct flock fl {};
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 201;
    fl.l_len = 1;
    ASSERT_EQ(::fcntl(fd, F_OFD_SETLK, &fl), 0);
    EXPECT_NE(usage_error(disk(u.path)).find("lock byte 201"), std::string::npos);
    EXPECT_EQ(usage_error(disk(u.path, true)), "");
    ::close(fd);
}

} // namespace
} // namespace kguest
