// A disk image for virtio-blk: a raw file or a block device, opened, checked
// and locked once, before the VM exists, so that every problem with it is one
// line and exit status 2 (a UsageError) before /dev/kvm is touched.
//
// Checks: a regular file or a block device (size from BLKGETSIZE64), a size
// that is a multiple of 512 bytes, not a qcow2/VMDK/VHD/VHDX header (kguest
// reads raw images only; the error says how to convert). cache=none opens
// with O_DIRECT and reports the alignment O_DIRECT needs as the logical block
// size.
//
// Locking, like QEMU's file-posix driver (block/file-posix.c), so that kguest
// and QEMU see each other's images: OFD byte-range read locks at
// RAW_LOCK_PERM_BASE (100) + n for each permission n held and at
// RAW_LOCK_SHARED_BASE (200) + n for each permission n not shared with
// others, n the bit number of QEMU's BLK_PERM_* (0 consistent read, 1 write,
// 2 write unchanged, 3 resize). A writer holds 100, 101, 102 and denies
// write and resize (201, 203); a reader holds 100 and denies write (201).
// So one writer excludes every other opener, readers share. OFD locks belong
// to the open file description: they conflict between two opens in the same
// process too, and go away when the Fd closes.
//
// Threading: a BlockImage is immutable after open; fd() may be used from any
// thread.
#pragma once

#include "devices/base/fd.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace kguest {

// One --disk option.
struct DiskConfig {
    std::string path;
    bool readonly = false;
    std::string serial;                           // "" = derived from the path
    enum class Cache { writeback, none } cache = Cache::writeback;
    unsigned queues = 1;
    bool discard = false;                         // DISCARD and WRITE_ZEROES
    std::string id;                               // the API's name for it ("" = _diskN)
};

inline constexpr unsigned kMaxBlkQueues = 64;
inline constexpr std::size_t kBlkIdBytes = 20;   // VIRTIO 1.2 5.2.6: GET_ID is 20 bytes

// The name of a foreign image format whose header starts `head` (at least
// 512 bytes of the file's start), or nullptr for anything else.
const char* foreign_image_format(std::span<const std::uint8_t> head);

// The default GET_ID serial: the last 20 bytes of the absolute path.
std::string default_disk_serial(std::string_view absolute_path);

class BlockImage {
public:
    // Opens, checks and locks cfg.path. Throws UsageError naming the path for
    // anything the user can fix (missing, a directory, a foreign format, a
    // size not a multiple of 512, locked by another process, O_DIRECT
    // unsupported), SysError for other failures.
    explicit BlockImage(const DiskConfig& cfg);

    int fd() const { return fd_.get(); }
    const std::string& path() const { return path_; }
    std::uint64_t size() const { return size_; }            // bytes, a multiple of 512
    std::uint32_t block_size() const { return block_size_; }   // logical block size
    bool readonly() const { return readonly_; }
    bool block_device() const { return block_device_; }
    bool direct() const { return direct_; }                 // O_DIRECT (cache=none)
    const std::string& serial() const { return serial_; }   // at most 20 bytes

private:
    Fd fd_;
    std::string path_;
    std::uint64_t size_ = 0;
    std::uint32_t block_size_ = 512;
    bool readonly_ = false;
    bool block_device_ = false;
    bool direct_ = false;
    std::string serial_;
};

// QEMU's lock protocol on an open image (see above); false, with `why` set,
// when another open file description holds a conflicting lock. Exposed for tests.
bool lock_image(int fd, bool writable, std::string& why);

} // namespace kguest
