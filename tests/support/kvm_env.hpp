// For the `kvm`-labelled suites: open /dev/kvm or fail. A kvm test that skips
// itself would count as passed without having run, so it fails instead,
// unless the user opted out with KGUEST_ALLOW_NO_KVM=1 (unit tests only).
#pragma once

#include "tests/support/process.hpp"
#include "vmm/kvm.hpp"

#include <cstdlib>
#include <cstring>
#include <gtest/gtest.h>
#include <memory>
#include <string>

namespace kguest::test {

inline bool allow_no_kvm() {
    const char* v = std::getenv("KGUEST_ALLOW_NO_KVM");
    return v != nullptr && std::strcmp(v, "1") == 0;
}

inline std::string env_or(const char* name, const std::string& fallback) {
    const char* v = std::getenv(name);
    return v != nullptr && *v != '\0' ? v : fallback;
}

// The Linux guest: $KGUEST_LINUX_KERNEL or /vmlinuz, and $KGUEST_LINUX_INITRD
// or the initramfs scripts/linux-initramfs builds (once per test process).
inline std::string linux_kernel() { return env_or("KGUEST_LINUX_KERNEL", "/vmlinuz"); }
inline std::string linux_initrd() {
    static std::string path = [] {
        std::string p = env_or("KGUEST_LINUX_INITRD", "");
        if (!p.empty()) return p;
        auto r = run_process({KGUEST_SOURCE_DIR "/scripts/linux-initramfs"}, 300);
        if (r.status != 0) return std::string();
        while (!r.out.empty() && r.out.back() == '\n') r.out.pop_back();
        return r.out.substr(r.out.rfind('\n') + 1);
    }();
    return path;
}

} // namespace kguest::test

// Declares `std::unique_ptr<kguest::Kvm> kvm` in the calling test body.
#define KGUEST_OPEN_KVM(kvm)                                                              \
    std::unique_ptr<::kguest::Kvm> kvm;                                                   \
    try {                                                                                 \
        kvm = std::make_unique<::kguest::Kvm>();                                          \
    } catch (const std::exception& e) {                                                   \
        if (::kguest::test::allow_no_kvm()) GTEST_SKIP() << "no usable KVM: " << e.what(); \
        FAIL() << "no usable KVM (" << e.what()                                           \
               << "); run through scripts/sandbox, or set KGUEST_ALLOW_NO_KVM=1 to skip";  \
    }
