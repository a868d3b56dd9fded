// Opening a disk image (see block_image.hpp).
#include "devices/block_image.hpp"

#include "devices/base/error.hpp"

#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <linux/fs.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace kguest {

namespace {

// QEMU's block/file-posix.c: RAW_LOCK_PERM_BASE, RAW_LOCK_SHARED_BASE, and
// the bit numbers of BLK_PERM_CONSISTENT_READ, _WRITE, _WRITE_UNCHANGED, _RESIZE.
constexpr off_t kLockPermBase = 100, kLockSharedBase = 200;
constexpr off_t kPermConsistentRead = 0, kPermWrite = 1, kPermWriteUnchanged = 2, kPermResize = 3;

bool starts_with(std::span<const std::uint8_t> head, std::string_view magic, std::size_t at = 0) {
    return head.size() >= at + magic.size() && std::memcmp(head.data() + at, magic.data(), magic.size()) == 0;
}

[[noreturn]] void refuse(const std::string& path, const std::string& why) { throw UsageError("--disk " + path + ": " + why); }

} // namespace

const char* foreign_image_format(std::span<const std::uint8_t> head) {
    // Each format's magic at offset 0 (qcow2: "QFI\xfb"; VMDK: a sparse
    // extent "KDMV", a hosted "COWD" or a text descriptor; VHD: the footer
    // copy "conectix" of a dynamic disk; VHDX: the file type identifier).
    if (starts_with(head, "QFI\xfb")) return "qcow2";
    if (starts_with(head, "KDMV") || starts_with(head, "COWD") || starts_with(head, "# Disk DescriptorFile"))
        return "VMDK";
    if (starts_with(head, "conectix")) return "VHD";
    if (starts_with(head, "vhdxfile")) return "VHDX";
    return nullptr;
}

std::string default_disk_serial(std::string_view absolute_path) {
    return std::string(absolute_path.size() > kBlkIdBytes ? absolute_path.substr(absolute_path.size() - kBlkIdBytes)
                                                          : absolute_path);
}

bool lock_image(int fd, bool writable, std::string& why) {
    // A one-byte lock request of `type` on `byte`.
    auto one_byte = [](short type, off_t byte) {
        struct flock fl {};
        fl.l_type = type;
        fl.l_whence = SEEK_SET;
        fl.l_start = byte;
        fl.l_len = 1;
        return fl;
    };
    auto set = [&](off_t byte) {
        struct flock fl = one_byte(F_RDLCK, byte);
        return ::fcntl(fd, F_OFD_SETLK, &fl) == 0;
    };
    // Whether another open file description holds a lock on `byte`.
    auto held = [&](off_t byte) {
        struct flock fl = one_byte(F_WRLCK, byte);
        if (::fcntl(fd, F_OFD_GETLK, &fl) != 0) return false;
        return fl.l_type != F_UNLCK;
    };
    // Ours first (QEMU's raw_apply_lock_bytes), then the others' (raw_check_lock_bytes).
    const std::vector<off_t> ours = writable
        ? std::vector<off_t>{kLockPermBase + kPermConsistentRead, kLockPermBase + kPermWrite,
                             kLockPermBase + kPermWriteUnchanged, kLockSharedBase + kPermWrite,
                             kLockSharedBase + kPermResize}
        : std::vector<off_t>{kLockPermBase + kPermConsistentRead, kLockSharedBase + kPermWrite};
    for (off_t b : ours)
        if (!set(b)) {
            why = std::string("cannot lock byte ") + std::to_string(b) + " (fcntl F_OFD_SETLK: " + std::strerror(errno) +
                  ")";
            return false;
        }
    // We deny writing to others: nobody else may hold write (101). A writer
    // also needs that nobody denies it writing (201), which every reader does.
    if (held(kLockPermBase + kPermWrite)) {
        why = "another process has it open for writing (lock byte 101 is held)";
        return false;
    }
    if (writable && held(kLockSharedBase + kPermWrite)) {
        why = "another process has it open and does not share writing (lock byte 201 is held)";
        return false;
    }
    return true;
}

BlockImage::BlockImage(const DiskConfig& cfg) : readonly_(cfg.readonly), direct_(cfg.cache == DiskConfig::Cache::none) {
    char* real = ::realpath(cfg.path.c_str(), nullptr);
    path_ = real != nullptr ? real : cfg.path;
    std::free(real);
    fd_ = Fd(::open(cfg.path.c_str(), (readonly_ ? O_RDONLY : O_RDWR) | O_CLOEXEC));
    if (!fd_.valid()) refuse(cfg.path, std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0) throw_errno("fstat " + cfg.path);
    if (S_ISBLK(st.st_mode)) {
        block_device_ = true;
        if (::ioctl(fd_.get(), BLKGETSIZE64, &size_) != 0) throw_errno("ioctl BLKGETSIZE64 " + cfg.path);
        int lbs = 0;
        if (::ioctl(fd_.get(), BLKSSZGET, &lbs) != 0) throw_errno("ioctl BLKSSZGET " + cfg.path);
        if (lbs >= 512 && lbs <= 65536) block_size_ = static_cast<std::uint32_t>(lbs);
    } else if (S_ISREG(st.st_mode)) {
        size_ = static_cast<std::uint64_t>(st.st_size);
    } else {
        refuse(cfg.path, "not a regular file or a block device");
    }
    if (size_ % 512 != 0)
        refuse(cfg.path, "size " + std::to_string(size_) + " bytes is not a multiple of 512 (a raw image is whole sectors)");

    // Foreign formats: the header at 0, and a fixed VHD's footer in the last sector.
    std::array<std::uint8_t, 512> head{};
    const ssize_t n = ::pread(fd_.get(), head.data(), head.size(), 0);
    if (n < 0) throw_errno("pread " + cfg.path);
    const char* format = foreign_image_format(std::span(head.data(), static_cast<std::size_t>(n)));
    if (format == nullptr && size_ >= 1024) {
        if (::pread(fd_.get(), head.data(), head.size(), static_cast<off_t>(size_ - 512)) == 512 &&
            starts_with(head, "conectix"))
            format = "VHD";
    }
    if (format != nullptr)
        refuse(cfg.path, std::string("a ") + format + " image; kguest reads raw images only: convert it with `qemu-img convert -O raw " +
                             cfg.path + " " + cfg.path + ".raw`");

    std::string why;
    if (!lock_image(fd_.get(), !readonly_, why)) refuse(cfg.path, why);

    if (direct_) {
        // cache=none: O_DIRECT on this open file description.
        const int fl = ::fcntl(fd_.get(), F_GETFL);
        if (fl < 0 || ::fcntl(fd_.get(), F_SETFL, fl | O_DIRECT) != 0)
            refuse(cfg.path, std::string("cache=none: its file system refuses O_DIRECT (fcntl F_SETFL: ") +
                                 std::strerror(errno) + ")");
        if (!block_device_) {
            // The alignment O_DIRECT wants, found the way QEMU's
            // raw_probe_alignment() does: the smallest read that works.
            void* raw = std::aligned_alloc(4096, 4096);
            if (raw == nullptr) throw SysError("aligned_alloc", ENOMEM);
            std::unique_ptr<void, decltype(&std::free)> buf(raw, &std::free);
            block_size_ = 4096;
            for (std::uint32_t bs : {512u, 1024u, 2048u})
                if (::pread(fd_.get(), buf.get(), bs, 0) >= 0) {
                    block_size_ = bs;
                    break;
                }
        }
    }
    serial_ = cfg.serial.empty() ? default_disk_serial(path_) : cfg.serial.substr(0, kBlkIdBytes);
}

} // namespace kguest
