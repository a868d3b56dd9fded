// kguest's command line. Each subcommand is a function; host setup failures
// are exceptions caught here, once, and printed as one line: exit status 2 for
// the user's mistakes (flags, images), 1 for host failures. `kguest run`
// otherwise returns the guest's own exit status.
#include "devices/base/error.hpp"
#include "vmm/app/api_client.hpp"
#include "vmm/app/disk_options.hpp"
#include "vmm/app/net_options.hpp"
#include "vmm/app/run.hpp"
#include "vmm/machine.hpp"
#include "devices/base/size.hpp"

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <exception>
#include <string>
#include <malloc.h>
#include <pthread.h>

namespace kguest {
namespace {

constexpr const char* kUsage =
    "usage: kguest run --kernel PATH [options]     boot a kernel (build/guest/guest.elf, a bzImage, a vmlinux)\n"
    "       kguest --api-socket path=PATH|fd=N [--event-monitor path=PATH|fd=N] [--seccomp ...] [--user ...]\n"
    "                                             a bare VMM: Cloud Hypervisor's API creates and boots its VM\n"
    "       kguest --version\n"
    "\n"
    "run options:\n"
    "  --kernel PATH             PVH ELF image or Linux bzImage to boot (required)\n"
    "  --initrd PATH             initial ramdisk (Linux: an initramfs)\n"
    "  --cmdline STR             kernel command line; for Linux appended to the default\n"
    "                            \"" KGUEST_LINUX_CMDLINE "\"\n"
    "  --no-default-cmdline      Linux: use --cmdline alone\n"
    "  --cpus N                  vCPUs, 1..254 (default 1)\n"
    "  --memory SIZE             guest RAM, K/M/G suffixes (default 256M, at least 8M)\n"
    "  --memory-max SIZE         grow the guest up to SIZE with virtio-mem (`kguest resize NAME --memory SIZE`)\n"
    "  --hugepages thp|hugetlbfs|off   RAM backing (default thp)\n"
    "  --console stdio|none|pty|socket=PATH|FILE   serial console (default stdio); pty: a pseudo-terminal\n"
    "                            whose path kguest prints; socket=PATH: a UNIX socket kguest listens on\n"
    "  --name NAME               VM name (default kguest)\n"
    "  --port80 kernel|exit      port 0x80 writes absorbed in KVM (default) or by userspace exits\n"
    "  --no-pv-spinlocks         hide KVM_FEATURE_PV_UNHALT from the guest (native spinlocks)\n"
    "  --net tap=IFNAME[,mac=MAC][,queues=N]   virtio-net on a TAP interface (created if missing)\n"
    "  --net stream=PATH[,mac=MAC]             virtio-net on a passt / QEMU -netdev stream socket\n"
    "                            (repeat --net for more devices)\n"
    "  --disk path=FILE[,readonly=on][,serial=ID][,cache=none|writeback][,queues=N][,discard=on]\n"
    "                            virtio-blk on a raw image or block device (repeatable)\n"
    "  --balloon[=KEY=on|off,...] a virtio-balloon device (resize with `kguest balloon NAME --target SIZE`);\n"
    "                            KEY: stats, deflate_on_oom, free_page_reporting (all on by default)\n"
    "  --api-socket PATH|none    control API socket (default $XDG_RUNTIME_DIR/kguest/NAME.sock,\n"
    "                            /run/kguest/NAME.sock for root)\n"
    "  --rng [src=PATH][,rate=BYTES][,burst=BYTES]  a virtio-rng device reading PATH (default /dev/urandom),\n"
    "                            at most rate bytes/s (default 1M; 0: unlimited) in bursts of up to burst\n"
    "  --prefault                fault all guest RAM in before boot (MADV_POPULATE_WRITE)\n"
    "  --boot-timeline           at exit, print when each boot step was reached\n"
    "  --seccomp on|log|off      system-call allow-lists per thread after set-up (default on; log:\n"
    "                            allow and log violations to the kernel log, for debugging)\n"
    "  --user UID[:GID]          when started as root, run as this user after set-up\n";

// --balloon=KEY=on|off,...: the features the balloon offers, in Cloud Hypervisor's names.
BalloonOptions parse_balloon_options(const std::string& spec) {
    BalloonOptions o;
    std::size_t pos = 0;
    while (pos <= spec.size()) {
        const std::size_t end = std::min(spec.find(',', pos), spec.size());
        const std::string item = spec.substr(pos, end - pos);
        const std::size_t eq = item.find('=');
        const std::string key = item.substr(0, eq), val = eq == std::string::npos ? "" : item.substr(eq + 1);
        if (val != "on" && val != "off") throw UsageError("--balloon '" + item + "': need KEY=on or KEY=off");
        bool* field = key == "stats" ? &o.stats : key == "deflate_on_oom" ? &o.deflate_on_oom
                    : key == "free_page_reporting" ? &o.reporting : nullptr;
        if (field == nullptr)
            throw UsageError("--balloon '" + key + "': unknown option (stats, deflate_on_oom, free_page_reporting)");
        *field = val == "on";
        pos = end + 1;
    }
    return o;
}

// --rng [src=PATH][,rate=BYTES[,burst=BYTES]]: the virtio-rng source and its
// token bucket (bytes per second, K/M/G suffixes; rate=0: unlimited).
void parse_rng_options(const std::string& spec, VmConfig& cfg) {
    cfg.rng = "";
    std::size_t pos = 0;
    bool burst_set = false;
    while (!spec.empty() && pos <= spec.size()) {
        const std::size_t end = std::min(spec.find(',', pos), spec.size());
        const std::string item = spec.substr(pos, end - pos);
        const std::size_t eq = item.find('=');
        const std::string key = item.substr(0, eq), val = eq == std::string::npos ? "" : item.substr(eq + 1);
        if (key == "src") {
            if (val.empty()) throw UsageError("--rng src= needs a path");
            cfg.rng = val;
        } else if (key == "rate" || key == "burst") {
            const auto n = parse_size(val);
            if (!n) throw UsageError("--rng " + key + "='" + val + "': need a byte count like 1M");
            (key == "rate" ? cfg.rng_limit.rate : cfg.rng_limit.burst) = *n;
            burst_set |= key == "burst";
        } else {
            throw UsageError("--rng '" + item + "': unknown option (src=PATH, rate=BYTES, burst=BYTES)");
        }
        pos = end + 1;
    }
    if (!burst_set) cfg.rng_limit.burst = cfg.rng_limit.rate;   // a second's worth
    if (cfg.rng_limit.rate != 0 && cfg.rng_limit.burst == 0) throw UsageError("--rng burst=0: the bucket must hold a byte");
}

int cmd_run(int argc, char** argv) {
    VmConfig cfg;
    ConfineOptions confine;
    Args a(argc, argv, 2);
    while (!a.done()) {
        std::string f = a.flag();
        if (f == "--kernel") {
            cfg.kernel = a.value(f);
        } else if (f == "--cmdline") {
            cfg.cmdline = a.value(f);
        } else if (f == "--initrd") {
            cfg.initrd = a.value(f);
            if (cfg.initrd.empty()) throw UsageError("--initrd needs a file name");
        } else if (f == "--no-default-cmdline") {
            a.no_value(f);
            cfg.default_cmdline = false;
        } else if (f == "--cpus") {
            std::string v = a.value(f);
            auto n = parse_size(v);
            if (!n || v.find_first_not_of("0123456789") != std::string::npos || *n < 1 || *n > kMaxCpus)
                throw UsageError("--cpus '" + v + "': need a number from 1 to " + std::to_string(kMaxCpus));
            cfg.cpus = static_cast<unsigned>(*n);
        } else if (f == "--memory") {
            std::string v = a.value(f);
            auto n = parse_size(v);
            if (!n) throw UsageError("--memory '" + v + "': need a size like 256M or 2G");
            if (*n < kMinMemory) throw UsageError("--memory " + v + ": too little memory (at least 8M)");
            cfg.memory = *n;
        } else if (f == "--memory-max") {
            std::string v = a.value(f);
            auto n = parse_size(v);
            if (!n) throw UsageError("--memory-max '" + v + "': need a size like 4G");
            if (*n % (2ull << 20) != 0) throw UsageError("--memory-max " + v + ": not a multiple of 2M (the virtio-mem block)");
            cfg.memory_max = *n;
        } else if (f == "--hugepages") {
            std::string v = a.value(f);
            auto b = parse_backing(v);
            if (!b) throw UsageError("--hugepages '" + v + "': need thp, hugetlbfs or off");
            cfg.backing = *b;
        } else if (f == "--console") {
            std::string v = a.value(f);
            if (v.empty()) throw UsageError("--console needs stdio, none, pty, socket=PATH or a file name");
            if (v == "stdio") cfg.console = VmConfig::Console::stdio;
            else if (v == "none") cfg.console = VmConfig::Console::none;
            else if (v == "pty") cfg.console = VmConfig::Console::pty;
            else if (v.rfind("socket=", 0) == 0) {
                cfg.console = VmConfig::Console::socket;
                cfg.console_path = v.substr(7);
                if (cfg.console_path.empty()) throw UsageError("--console socket= needs a path");
            } else { cfg.console = VmConfig::Console::file; cfg.console_path = v; }
        } else if (f == "--name") {
            cfg.name = a.value(f);
            if (cfg.name.empty() || cfg.name.find_first_of("/ \t\n") != std::string::npos)
                throw UsageError("--name '" + cfg.name + "': need a name without spaces or slashes");
        } else if (f == "--port80") {
            std::string v = a.value(f);
            if (v == "kernel") cfg.port80 = VmConfig::Port80Mode::kernel;
            else if (v == "exit") cfg.port80 = VmConfig::Port80Mode::exit;
            else throw UsageError("--port80 '" + v + "': need kernel or exit");
        } else if (f == "--net") {
            cfg.nets.push_back(parse_net_spec(a.value(f), static_cast<unsigned>(cfg.nets.size())));
        } else if (f == "--disk") {
            cfg.disks.push_back(parse_disk_spec(a.value(f)));
        } else if (f == "--balloon") {
            cfg.balloon = true;
            if (auto v = a.optional_value()) cfg.balloon_options = parse_balloon_options(*v);
        } else if (f == "--rng") {
            parse_rng_options(a.optional_next_value().value_or(""), cfg);
        } else if (f == "--prefault") {
            a.no_value(f);
            cfg.prefault = true;
        } else if (f == "--boot-timeline") {
            a.no_value(f);
            cfg.boot_timeline = true;
        } else if (f == "--api-socket") {
            cfg.api_socket = a.value(f);
            if (cfg.api_socket.empty()) throw UsageError("--api-socket needs a path or none");
        } else if (f == "--seccomp") {
            std::string v = a.value(f);
            auto m = parse_seccomp_mode(v);
            if (!m) throw UsageError("--seccomp '" + v + "': need on, log or off");
            confine.seccomp = *m;
        } else if (f == "--user") {
            confine.user = parse_user(a.value(f));
        } else if (f == "--no-pv-spinlocks") {
            a.no_value(f);
            cfg.pv_spinlocks = false;
        } else {
            throw UsageError("run: unknown option '" + f + "' (see kguest --help)");
        }
    }
    if (cfg.kernel.empty()) throw UsageError("run: --kernel PATH is required");
    if (cfg.memory_max != 0) {
        // --memory is rounded up to 2 MiB like the RAM mapping.
        const std::uint64_t boot = (cfg.memory + (2ull << 20) - 1) & ~((2ull << 20) - 1);
        if (cfg.memory_max < boot)
            throw UsageError("--memory-max " + format_size(cfg.memory_max) + " is below --memory " + format_size(boot));
        if (cfg.memory_max - boot > (1ull << 46)) throw UsageError("--memory-max " + format_size(cfg.memory_max) + " is too large");
        if (cfg.memory_max > boot && cfg.backing == Backing::hugetlbfs)
            throw UsageError("--memory-max needs --hugepages thp or off (hugetlbfs for hot-plugged memory is not supported)");
        cfg.memory = boot;
    }
    return run_vm(cfg, confine);
}

// `kguest --api-socket ...`: a bare VMM, started the way libvirt's ch driver
// and Kata's clh driver start Cloud Hypervisor.
int cmd_bare_vmm(int argc, char** argv) {
    BareVmmOptions o;
    bool have_api = false;
    Args a(argc, argv, 1);
    while (!a.done()) {
        std::string f = a.flag();
        if (f == "--api-socket") {
            o.api = parse_path_or_fd(f, a.value(f));
            have_api = true;
        } else if (f == "--event-monitor") {
            std::string v = a.value(f);
            parse_path_or_fd(f, v);   // checked now; opened by run_bare_vmm
            o.event_monitor = v;
        } else if (f == "--seccomp") {
            std::string v = a.value(f);
            auto m = parse_seccomp_mode(v);
            if (!m) throw UsageError("--seccomp '" + v + "': need on, log or off");
            o.confine.seccomp = *m;
        } else if (f == "--user") {
            o.confine.user = parse_user(a.value(f));
        } else {
            throw UsageError("unknown option '" + f + "' for a bare VMM (--api-socket, --event-monitor, --seccomp, --user)");
        }
    }
    if (!have_api) throw UsageError("a bare VMM needs --api-socket path=PATH or fd=N");
    return run_bare_vmm(o);
}

// `--version`. The number is the Cloud Hypervisor release whose API kguest
// answers (vm.create's VmConfig with `payload`, vm.info, vm.resize's
// desired_ram), not kguest's own (vmm.ping's "version"): libvirt's ch driver
// (src/ch/ch_conf.c, chExtractVersion) refuses anything before v15.0, sends
// the kernel as `payload` only from v28.0 (ch_capabilities.c) and parses
// "cloud-hypervisor vX.Y.Z" (so under that name, e.g. through a symlink,
// kguest says so); Kata's clh driver reads the same line.
constexpr const char* kChApiVersion = "41.0.0";

int print_version(const char* argv0) {
    std::string name = argv0;
    if (auto slash = name.rfind('/'); slash != std::string::npos) name = name.substr(slash + 1);
    std::printf("%s v%s\n", name == "cloud-hypervisor" ? "cloud-hypervisor" : "kguest", kChApiVersion);
    return 0;
}

} // namespace
} // namespace kguest

int main(int argc, char** argv) {
    using namespace kguest;
    // `kguest run ... | head`: a reader that went away makes writes fail with
    // EPIPE (the console and the log drop them) instead of SIGPIPE ending the
    // VM without its stop path. Inherited by every thread; exec resets it.
    if (std::signal(SIGPIPE, SIG_IGN) == SIG_ERR) {
        std::perror("kguest: signal(SIGPIPE)");
        return 1;
    }
    // 1 MiB thread stacks instead of glibc's 8 MiB: none needs more, and a
    // mapping under 2 MiB never gets a transparent huge page with THP "always"
    // (Debian's default), which added 2 MiB of RSS per thread now and then
    // (seen in scripts/linux-boot-bench).
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) == 0) {
        if (pthread_attr_setstacksize(&attr, 1 << 20) == 0) pthread_setattr_default_np(&attr);
        pthread_attr_destroy(&attr);
    }
    // One malloc arena for every thread. A thread's own arena, when its heap
    // shrinks, makes glibc read /proc/sys/vm/overcommit_memory (malloc's
    // check_may_shrink_heap) with openat, which no confined thread's list
    // allows: scripts/seccomp-audit caught a vCPU thread doing it. The VMM's
    // threads allocate little after set-up, and the arenas' own pages (in
    // scripts/footprint's "other anonymous") go too.
    // (A sanitizer build's allocator has no arenas; its mallopt answers 0.)
    mallopt(M_ARENA_MAX, 1);
    try {
        if (argc < 2) throw UsageError("no command given (see kguest --help)");
        std::string cmd = argv[1];
        if (cmd == "--help" || cmd == "-h" || cmd == "help") {
            std::printf("%s\ncontrol commands (through a running VM's API socket):\n%s", kUsage, cli_usage());
            return 0;
        }
        if (cmd == "list" || cmd == "info" || cmd == "balloon" || cmd == "resize" || cmd == "stats" || cmd == "pause" || cmd == "resume" ||
            cmd == "stop" || cmd == "power-button")
            return cli_main(argc, argv);
        if (cmd == "--version") return print_version(argv[0]);
        if (cmd.rfind("--api-socket", 0) == 0 || cmd.rfind("--event-monitor", 0) == 0) return cmd_bare_vmm(argc, argv);
        if (cmd == "run") return cmd_run(argc, argv);
        throw UsageError("unknown command '" + cmd + "' (see kguest --help)");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kguest: %s\n", e.what());
        return dynamic_cast<const UsageError*>(&e) ? 2 : 1;
    }
}
