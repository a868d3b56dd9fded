// The include-layer check: reads the `#include` lines of the product sources
// and names every include that points to a layer above the including file's
// own. The layers, lowest first (a file belongs to the longest folder that
// prefixes its path):
//
//   0 devices/base/  the foundation: fd, errors, logging, the bus, guest memory
//   1 devices/       device models
//   2 balloon/       the balloon device
//   3 vmm/           KVM objects and the x86 board
//   4 vmm/app/       the application: CLI, control API server and client
//
// A file may include its own layer or lower ones. Layers 0-2 never include a
// KVM header (<linux/kvm*.h>, <asm/kvm*.h>; vmm/kvm_uapi.hpp is layer 3
// anyway): what wires devices to KVM lives in vmm/. No product file includes
// tests/ or guest/, which are outside the check. Quoted includes resolve as
// the compiler resolves them (the including file's folder, then the
// repository root, which is the include path); an angled include counts only
// when it names a file of the tree. Tests only; no state, no threads.
#pragma once

#include <cstddef>
#include <filesystem>
#include <string>
#include <vector>

namespace kguest::test {

struct LayerViolation {
    std::string file;     // relative to the root, e.g. "devices/serial.cpp"
    int line = 0;         // 1-based
    std::string include;  // as spelled, with its quotes or angle brackets
    std::string why;      // e.g. "layer 3 vmm/ above layer 1 devices/"
};

struct LayerReport {
    std::size_t files = 0, includes = 0;  // what was read, so an empty scan shows
    std::vector<LayerViolation> violations;  // by file, then line
};

// "devices/serial.cpp:12: includes "vmm/kvm.hpp" (layer 3 vmm/ above layer 1 devices/)"
std::string to_string(const LayerViolation& v);

// Scans devices/, balloon/ and vmm/ under root. Throws std::runtime_error when
// one of them is missing or a file cannot be read.
LayerReport check_layers(const std::filesystem::path& root);

} // namespace kguest::test
