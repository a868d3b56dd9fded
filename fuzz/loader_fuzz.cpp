// libFuzzer target: the kernel loaders (vmm/loader.*): a PVH ELF or a Linux
// bzImage, with an initrd and a command line, into a 16 MiB guest. The input
// is the image; its last bytes, when the fuzzer sets a flag byte, also give
// the command line and an initrd. Malformed images must be refused with a
// UsageError; any other exception, a crash, UB or an access outside the
// image or guest RAM is a bug. The seeds (fuzz/corpus/loader/) are a minimal
// PVH ELF and a minimal bzImage (made by fuzz/make_seeds.py).
// Single-threaded: libFuzzer calls LLVMFuzzerTestOneInput on one thread.
#include "vmm/loader.hpp"
#include "devices/base/error.hpp"
#include "devices/base/guest_memory.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

using namespace kguest;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    static GuestMemory mem(16 << 20, Backing::off);
    std::span<const std::uint8_t> image(data, size);
    std::string cmdline = "console=ttyS0";
    std::vector<std::uint8_t> initrd;
    // With 0xa5 as the last byte (rare in images, so the fuzzer chooses), the
    // input ends in "<initrd><cmdline><le16 initrd len><le16 cmdline len><0xa5>";
    // the image is what comes before.
    if (size >= 5 && data[size - 1] == 0xa5) {
        std::size_t rest = size - 5;
        const std::size_t initrd_len = std::min<std::size_t>(data[size - 5] | data[size - 4] << 8, rest);
        std::size_t cmd_len = std::min<std::size_t>(data[size - 3] | data[size - 2] << 8, rest - initrd_len);
        cmdline.assign(reinterpret_cast<const char*>(data + rest - cmd_len), cmd_len);
        rest -= cmd_len;
        initrd.assign(data + rest - initrd_len, data + rest);
        rest -= initrd_len;
        image = std::span<const std::uint8_t>(data, rest);
    }
    (void)is_linux_kernel(image);
    try {
        (void)parse_setup_header(image);
    } catch (const UsageError&) {
    }
    try {
        (void)load_kernel(mem, image, initrd, cmdline, 0xf0000);
    } catch (const UsageError&) {
    }
    return 0;
}
