// kguest's command line. Every subcommand is a function; host setup failures
// are exceptions caught here, once, and printed as one line.
#include "vmm/error.hpp"

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

namespace {

constexpr const char* kUsage =
    "usage: kguest run --kernel PATH [options]   boot a guest\n"
    "       kguest --version\n";

} // namespace

int main(int argc, char** argv) {
    try {
        if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
            std::fputs(kUsage, argc < 2 ? stderr : stdout);
            return argc < 2 ? 2 : 0;
        }
        std::string cmd = argv[1];
        if (cmd == "--version") {
            std::printf("kguest %s\n", KGUEST_VERSION);
            return 0;
        }
        throw kguest::UsageError("unknown command '" + cmd + "' (see kguest --help)");
    } catch (const kguest::UsageError& e) {
        std::fprintf(stderr, "kguest: %s\n", e.what());
        return 2;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kguest: %s\n", e.what());
        return 1;
    }
}
