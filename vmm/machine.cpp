// Building and running a VM (see machine.hpp). The story in order: open KVM
// and check what we rely on, create the VM with its in-kernel interrupt
// controllers and PIT, map guest RAM, plug devices into the buses, load the
// kernel, create and set up the vCPUs; run() then starts a thread per vCPU and
// waits, in the main thread, for the VM to end or a signal to arrive.
#include "vmm/machine.hpp"
#include "vmm/cpuid.hpp"
#include "devices/base/error.hpp"
#include "vmm/exit.hpp"
#include "devices/base/log.hpp"
#include "devices/base/size.hpp"
#include "vmm/acpi.hpp"
#include "devices/acpi_pm.hpp"
#include "devices/exit_port.hpp"
#include "devices/i8042.hpp"
#include "devices/rtc.hpp"
#include "devices/pci.hpp"
#include "devices/virtio_net.hpp"
#include "balloon/balloon.hpp"
#include "vmm/app/api.hpp"
#include "vmm/app/api_client.hpp"
#include "vmm/virtio_kvm.hpp"
#include "devices/port80.hpp"
#include "vmm/port80_kvm.hpp"
#include "devices/serial.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <sys/ioctl.h>
#include <optional>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <termios.h>
#include <unistd.h>

namespace kguest {

namespace {

// Addresses KVM needs for its own use on Intel (real-mode TSS and identity
// page table for unrestricted-guest-less hosts), in the MMIO hole below the
// IOAPIC, as QEMU and Firecracker place them.
constexpr std::uint64_t kTssAddr = 0xfffbd000;
constexpr std::uint64_t kIdentityMapAddr = 0xfffbc000;

// The kick signal: its handler does nothing; its arrival makes KVM_RUN return EINTR.
constexpr int kKickSignal = SIGUSR1;
void on_kick(int) {}

// Where a vCPU stands, for the log when the VM is stopped from outside (a
// hung guest's post-mortem, like QEMU's `info registers` and `info lapic`):
// RIP, the multiprocessing state, and the highest vectors in service (ISR)
// and pending (IRR) in its LAPIC. A vector left in service masks every
// interrupt at or below its priority class: that is how a lost EOI looks.
std::string describe_vcpu(const Vcpu& v) {
    static constexpr const char* kMpStates[] = {"runnable", "uninitialized", "init-received", "halted", "sipi-received"};
    kvm_mp_state mp{};
    const char* state = ::ioctl(v.fd(), KVM_GET_MP_STATE, &mp) != 0 ? "unknown"
                        : mp.mp_state < std::size(kMpStates)         ? kMpStates[mp.mp_state]
                                                                      : "other";
    auto highest = [](const kvm_lapic_state& l, unsigned base) {   // 8 registers of 32 bits, 16 bytes apart
        for (int i = 7; i >= 0; --i) {
            std::uint32_t w;
            std::memcpy(&w, l.regs + base + 16 * i, 4);
            if (w != 0) return std::to_string(32 * i + 31 - __builtin_clz(w));
        }
        return std::string("none");
    };
    try {
        const kvm_regs r = v.get_regs();
        const kvm_lapic_state l = v.get_lapic();
        char line[160];
        std::snprintf(line, sizeof line, "rip 0x%llx, %s, LAPIC in service %s, pending %s",
                      static_cast<unsigned long long>(r.rip), state, highest(l, 0x100).c_str(), highest(l, 0x200).c_str());
        return line;
    } catch (const std::exception& e) {
        return std::string(state) + " (" + e.what() + ")";
    }
}

// Puts a terminal in raw-ish mode for the serial console and restores it on
// destruction (run() returning, normally or by exception). ISIG stays on, so
// Ctrl-C is SIGINT and stops the VM cleanly; output processing stays on.
class RawTerminal {
public:
    explicit RawTerminal(int fd) : fd_(fd) {
        if (!::isatty(fd) || ::tcgetattr(fd, &saved_) != 0) return;
        termios raw = saved_;
        raw.c_iflag &= ~static_cast<tcflag_t>(IGNBRK | BRKINT | PARMRK | ISTRIP | INLCR | IGNCR | ICRNL | IXON);
        raw.c_lflag &= ~static_cast<tcflag_t>(ECHO | ECHONL | ICANON | IEXTEN);
        raw.c_cc[VMIN] = 1;
        raw.c_cc[VTIME] = 0;
        active_ = ::tcsetattr(fd, TCSANOW, &raw) == 0;
    }
    ~RawTerminal() {
        if (active_) ::tcsetattr(fd_, TCSANOW, &saved_);
    }
    RawTerminal(const RawTerminal&) = delete;
    RawTerminal& operator=(const RawTerminal&) = delete;

private:
    int fd_;
    termios saved_{};
    bool active_ = false;
};

} // namespace

namespace {
// Reads the kernel (and initrd), writes the ACPI tables, picks the command
// line and loads it all into guest RAM. Errors name the file.
BootPlan boot_guest(GuestMemory& mem, const VmConfig& cfg) {
    const FileImage image = read_file(cfg.kernel, mem.size());
    std::optional<FileImage> initrd;
    if (!cfg.initrd.empty()) initrd.emplace(read_file(cfg.initrd, mem.size()));
    AcpiConfig acpi;
    acpi.cpus = cfg.cpus;
    acpi.pm_port = AcpiPm::kBase;
    const std::uint64_t rsdp = write_acpi_tables(mem, acpi);
    const std::string linux_cmdline = cfg.default_cmdline
        ? KGUEST_LINUX_CMDLINE + (cfg.cmdline.empty() ? "" : " " + cfg.cmdline) : cfg.cmdline;
    try {
        // A Linux kernel (bzImage, or a vmlinux with Linux's ELF notes) gets
        // the default command line; our own guest gets --cmdline as it is.
        return load_kernel(mem, image.bytes(), initrd ? initrd->bytes() : std::span<const std::uint8_t>(),
                           is_linux_kernel(image.bytes()) ? linux_cmdline : cfg.cmdline, rsdp);
    } catch (const UsageError& e) {
        throw UsageError(cfg.kernel + ": " + e.what());
    }
}
} // namespace

Machine::Machine(const VmConfig& cfg)
    : cfg_(cfg),
      mem_(cfg.memory, cfg.backing),
      boot_(boot_guest(mem_, cfg)),
      kvm_(),
      vm_(kvm_.create_vm()) {
    kvm_.require_extension(KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP");
    kvm_.require_extension(KVM_CAP_PIT2, "KVM_CAP_PIT2");
    kvm_.require_extension(KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY");
    kvm_.require_extension(KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID");
    kvm_.require_extension(KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT");
    int max_vcpus = kvm_.check_extension(KVM_CAP_MAX_VCPUS);
    if (max_vcpus <= 0) max_vcpus = kvm_.check_extension(KVM_CAP_NR_VCPUS);
    if (max_vcpus > 0 && cfg.cpus > static_cast<unsigned>(max_vcpus))
        throw UsageError("--cpus " + std::to_string(cfg.cpus) + ": this host's KVM allows at most " +
                         std::to_string(max_vcpus));

    vm_.set_tss_addr(kTssAddr);
    vm_.set_identity_map_addr(kIdentityMapAddr);
    vm_.create_irqchip();
    vm_.create_pit2();

    std::uint32_t slot = 0;
    for (const auto& r : mem_.regions())
        vm_.set_user_memory_region(slot++, r.gpa.value(), r.size, mem_.host_address_for_kvm(r));

    // Console sink.
    switch (cfg.console) {
    case VmConfig::Console::stdio: console_fd_ = STDOUT_FILENO; break;
    case VmConfig::Console::none: console_fd_ = -1; break;
    case VmConfig::Console::file: {
        int fd = ::open(cfg.console_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) throw UsageError("--console " + cfg.console_path + ": " + std::strerror(errno));
        console_file_ = Fd(fd);
        console_fd_ = fd;
        break;
    }
    }

    // Devices.
    serial_ = std::make_shared<Serial>(console_fd_, [this](bool level) {
        if (int err = vm_.irq_line(Serial::kCom1Irq, level)) {
            static RateLimit limit;
            KGUEST_LOG_LIMITED(limit, "serial: KVM_IRQ_LINE: %s (errno %d)", std::strerror(err), err);
        }
    });
    port80_ = std::make_shared<Port80>();
    exit_port_ = std::make_shared<ExitPort>([this](int status) { request_stop(status); });
    pio_.insert(Serial::kCom1Base, 8, serial_);
    pio_.insert(Port80::kPort, Port80::kLen, port80_);
    pio_.insert(ExitPort::kPort, ExitPort::kLen, exit_port_);
    // What Linux needs without a BIOS: the CMOS clock, the i8042's reset line
    // (reboot=k) and the ACPI sleep/reset registers the FADT points at.
    std::uint64_t below_4g = 0, above_4g = 0;
    for (const auto& r : mem_.regions()) (r.gpa.value() < kHighRamStart ? below_4g : above_4g) += r.size;
    rtc_ = std::make_shared<Rtc>(below_4g, above_4g);
    pio_.insert(Rtc::kBase, Rtc::kLen, rtc_);
    i8042_ = std::make_shared<I8042>([this] { guest_reset(); });
    pio_.insert(I8042::kDataPort, 1, i8042_->data_port());
    pio_.insert(I8042::kCommandPort, 1, i8042_->command_port());
    acpi_pm_ = std::make_shared<AcpiPm>([this] { guest_power_off(); }, [this] { guest_reset(); });
    pio_.insert(AcpiPm::kBase, AcpiPm::kLen, acpi_pm_);
    // PCI bus 0 (configuration mechanism #1) with its host bridge at 00:00.0;
    // virtio-pci devices will sit in the slots after it.
    pci_ = std::make_shared<PciHostBridge>();
    pio_.insert(PciHostBridge::kBase, PciHostBridge::kLen, pci_);
    gsi_router_ = std::make_unique<GsiRouter>(vm_);

    // virtio-net devices (VIRTIO 1.2 5.1), class 0x020000 (Ethernet).
    for (const auto& n : cfg.nets) {
        auto dev = std::make_shared<VirtioNet>(open_backend(n), n.mac);
        auto& pci_slot = add_virtio(dev, 0x020000);
        log_msg("virtio-net %s on %s %s at PCI 00:%02x.0, %u queue pair(s), kicks %s", format_mac(n.mac).c_str(),
                n.kind == NetConfig::Kind::tap ? "TAP" : "stream", n.target.c_str(), static_cast<unsigned>(virtio_.size()),
                dev->queue_pairs(), pci_slot.ioeventfds() ? "by ioeventfd" : "by MMIO exit");
        nets_.push_back(std::move(dev));
    }

    // virtio-balloon (VIRTIO 1.2 5.5), class 0xff0000 as QEMU's.
    if (cfg.balloon) {
        balloon_ = std::make_shared<VirtioBalloon>(mem_, cfg.balloon_options);
        add_virtio(balloon_, 0xff0000);
        log_msg("virtio-balloon at PCI 00:%02x.0 (stats, deflate-on-OOM, free page reporting)",
                static_cast<unsigned>(virtio_.size()));
    }
    if (cfg.prefault) mem_.prefault();

    // vCPUs: all get CPUID, FPU and LAPIC setup; only the BSP gets registers.
    // The APs sit in wait-for-SIPI inside KVM until the guest starts them.
    auto supported = kvm_.supported_cpuid();
    pv_features_ = kWantedPvFeatures;
    if (!cfg.pv_spinlocks) pv_features_ &= ~(1u << KVM_FEATURE_PV_UNHALT);
    // Hack: PVM, the software-only KVM some CI hosts run (kvm_pvm.ko), lists
    // the hypercall-based PV features, but a guest's VMCALL/VMMCALL never
    // completes there (seen: the vCPU hangs in KVM_HC_KICK_CPU). Offer them
    // only where the standard hypercall instruction works.
    if (std::filesystem::exists("/sys/module/kvm_pvm") && (pv_features_ & kHypercallPvFeatures)) {
        log_msg("host KVM is PVM: hiding PV_UNHALT, PV_SEND_IPI and PV_SCHED_YIELD (its hypercalls hang the guest)");
        pv_features_ &= ~kHypercallPvFeatures;
    }
    for (unsigned i = 0; i < cfg.cpus; ++i) {
        vcpus_.push_back(vm_.create_vcpu(i));
        setup_vcpu(vcpus_.back(), supported);
    }
    setup_boot_cpu(vcpus_[0]);

    // Port 0x80's in-kernel path. The coalesced ring is a page of every
    // vCPU's mapping, at the offset KVM_CAP_COALESCED_MMIO returns.
    if (cfg.port80 == VmConfig::Port80Mode::kernel) {
        kvm_coalesced_mmio_ring* ring = nullptr;
        int page = kvm_.check_extension(KVM_CAP_COALESCED_MMIO);
        if (kvm_.check_extension(KVM_CAP_COALESCED_PIO) > 0 && page > 0 &&
            (static_cast<std::size_t>(page) + 1) * 4096 <= kvm_.vcpu_mmap_size())
            ring = reinterpret_cast<kvm_coalesced_mmio_ring*>(reinterpret_cast<std::uint8_t*>(&vcpus_[0].run_state()) +
                                                              static_cast<std::size_t>(page) * 4096);
        port80_absorber_ = std::make_unique<Port80Absorber>(*port80_);
        if (!port80_absorber_->absorb(vm_, ring)) port80_absorber_.reset();
    }

    int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) throw_errno("eventfd");
    stop_event_ = Fd(efd);
}

Machine::~Machine() {
    // run() joins its threads on every path; this covers a Machine that was
    // built but never run, or a run() that threw while starting threads.
    if (!threads_.empty() || input_.joinable()) {
        request_stop(1);
        for (auto& t : threads_)
            if (t.joinable()) t.join();
        if (input_.joinable()) input_.join();
    }
}

VirtioPciSlot& Machine::add_virtio(std::shared_ptr<VirtioDevice> dev, std::uint32_t class_code) {
    // BARs from the bottom of the 32-bit MMIO hole, one kBarSize apart (a
    // power of two, so each is naturally aligned as PCI requires).
    const unsigned slot = static_cast<unsigned>(virtio_.size()) + 1;
    if (slot >= PciHostBridge::kSlots) throw UsageError("too many PCI devices (at most 31)");
    const std::uint64_t bar = kMmioHoleStart + (slot - 1) * VirtioPciDevice::kBarSize;
    virtio_.push_back(std::make_unique<VirtioPciSlot>(vm_, *gsi_router_, mmio_, mem_, *pci_, std::move(dev),
                                                      class_code, slot, bar));
    return *virtio_.back();
}

void Machine::setup_vcpu(Vcpu& vcpu, const std::vector<kvm_cpuid_entry2>& supported) {
    CpuidOptions opt;
    opt.vcpu_id = vcpu.id();
    opt.cpus = cfg_.cpus;
    opt.tsc_deadline = kvm_.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
    opt.pv_features = pv_features_;
    vcpu.set_cpuid(make_guest_cpuid(supported, opt));

    kvm_fpu fpu{};
    fpu.fcw = 0x37f;     // x87 reset value
    fpu.mxcsr = 0x1f80;  // SSE reset value: all exceptions masked
    vcpu.set_fpu(fpu);

    // LINT0 = ExtINT (the 8259 PIC's output), LINT1 = NMI, as on a PC.
    kvm_lapic_state lapic = vcpu.get_lapic();
    auto set_lvt = [&](std::size_t reg, std::uint32_t mode) {
        std::uint32_t v;
        std::memcpy(&v, lapic.regs + reg, 4);
        v = (v & ~0x700u) | (mode << 8);
        std::memcpy(lapic.regs + reg, &v, 4);
    };
    set_lvt(0x350, 7);  // APIC_LVT0, delivery mode ExtINT
    set_lvt(0x360, 4);  // APIC_LVT1, delivery mode NMI
    vcpu.set_lapic(lapic);
}

void Machine::setup_boot_cpu(Vcpu& vcpu) {
    // One GDT serves both boot protocols: PVH uses 0x08/0x10 (flat 32-bit
    // code and data), Linux's 64-bit entry __BOOT_CS 0x10 / __BOOT_DS 0x18
    // (boot.rst) -- hence two code descriptors. Written to guest memory too,
    // so selectors stay meaningful until the kernel loads its own GDT.
    const bool lm = boot_.mode == BootPlan::Mode::linux64;
    const std::uint64_t gdt[5] = {
        0,
        0x00cf9b000000ffff,                                // 0x08: code, 32-bit, 4 GiB
        lm ? 0x00af9b000000ffffull : 0x00cf93000000ffffull,  // 0x10: code, 64-bit (linux64) / data (PVH)
        0x00cf93000000ffff,                                // 0x18: data, 4 GiB
        0x00008b0000000067,                                // 0x20: 32-bit TSS (busy)
    };
    mem_.write(Gpa(kBootGdtGpa), gdt, sizeof gdt);

    kvm_sregs s = vcpu.get_sregs();
    auto seg = [](std::uint16_t sel, std::uint8_t type, bool code_or_data) {
        kvm_segment g{};
        g.base = 0;
        g.limit = 0xffffffff;
        g.selector = sel;
        g.type = type;
        g.present = 1;
        g.dpl = 0;
        g.db = 1;
        g.s = code_or_data ? 1 : 0;
        g.g = 1;
        return g;
    };
    s.tr = seg(0x20, 0xb, false);
    s.tr.limit = 0x67;
    s.tr.g = 0;
    s.tr.db = 0;
    s.gdt.base = kBootGdtGpa;
    s.gdt.limit = sizeof gdt - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    kvm_regs r{};
    r.rip = boot_.entry;
    r.rflags = 0x2;  // interrupts off
    if (lm) {
        // Linux 64-bit boot protocol: long mode, paging on with the identity
        // tables at kPml4Gpa, CS = __BOOT_CS (L=1), DS/ES/SS = __BOOT_DS, %rsi =
        // boot_params.
        s.cs = seg(0x10, 0xb, true);
        s.cs.l = 1;
        s.cs.db = 0;
        s.ds = s.es = s.fs = s.gs = s.ss = seg(0x18, 0x3, true);
        s.cr0 = 0x80000031;  // PG | NE | ET | PE
        s.cr3 = kPml4Gpa;
        s.cr4 = 0x20;        // PAE
        s.efer = 0x500;      // LMA | LME
        r.rsi = boot_.arg;
    } else {
        // PVH boot ABI: 32-bit protected mode, flat 4 GiB CS (execute/read)
        // and DS/ES/SS (read/write), a 32-bit TSS in TR, CR0.PE=1 with paging
        // off, CR4=0, %ebx = start_info.
        s.cs = seg(0x08, 0xb, true);
        s.ds = s.es = s.fs = s.gs = s.ss = seg(0x10, 0x3, true);
        s.cr0 = 0x11;  // PE | ET
        s.cr3 = 0;
        s.cr4 = 0;
        s.efer = 0;
        r.rbx = boot_.arg;
    }
    vcpu.set_sregs(s);
    vcpu.set_regs(r);
}

void Machine::guest_power_off() {
    log_msg("guest powered off (ACPI S5)");
    request_stop(0);
}

void Machine::guest_reset() {
    // kguest does not restart guests (nor do Firecracker and kvmtool): a
    // reset ends the VM. Status 0, since `reboot` is a clean request too.
    log_msg("guest reset the machine (reboot); ending the VM");
    request_stop(0);
}

void Machine::request_stop(int status) {
    bool expected = false;
    if (!stopping_.compare_exchange_strong(expected, true)) return;
    status_.store(status);
    // immediate_exit first, then the signal: a vCPU between its stopping_
    // check and KVM_RUN still returns at once (KVM_CAP_IMMEDIATE_EXIT).
    for (auto& v : vcpus_) v.run_state().immediate_exit = 1;
    for (auto& t : threads_)
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) pthread_kill(t.native_handle(), kKickSignal);
    {
        std::lock_guard lock(pause_mu_);   // parked vCPUs wake up and leave
        pause_cv_.notify_all();
    }
    std::uint64_t one = 1;
    if (stop_event_.valid() && ::write(stop_event_.get(), &one, sizeof one) < 0) {
        // The eventfd counter cannot overflow with one write; nothing to do.
    }
}

bool Machine::pause() {
    std::unique_lock lock(pause_mu_);
    if (stopping_.load()) return false;
    paused_.store(true);
    // The same kick as request_stop: immediate_exit, then the signal.
    for (auto& v : vcpus_) v.run_state().immediate_exit = 1;
    for (auto& t : threads_)
        if (t.joinable() && t.get_id() != std::this_thread::get_id()) pthread_kill(t.native_handle(), kKickSignal);
    return pause_cv_.wait_for(lock, std::chrono::seconds(5), [&] {
        return stopping_.load() || parked_ + halted_.load() >= threads_.size();
    }) && !stopping_.load();
}

void Machine::resume() {
    std::lock_guard lock(pause_mu_);
    paused_.store(false);
    pause_cv_.notify_all();
}

void Machine::park(Vcpu& vcpu) {
    std::unique_lock lock(pause_mu_);
    ++parked_;
    pause_cv_.notify_all();
    pause_cv_.wait(lock, [&] { return !paused_.load() || stopping_.load(); });
    --parked_;
    // Re-arm KVM_RUN; request_stop sets stopping_ before immediate_exit, so
    // checking again after clearing cannot lose a stop.
    vcpu.run_state().immediate_exit = 0;
    if (stopping_.load()) vcpu.run_state().immediate_exit = 1;
}

void Machine::vcpu_thread(Vcpu& vcpu) {
    sigset_t kick;
    sigemptyset(&kick);
    sigaddset(&kick, kKickSignal);
    pthread_sigmask(SIG_UNBLOCK, &kick, nullptr);

    const std::size_t run_size = kvm_.vcpu_mmap_size();
    while (!stopping_.load(std::memory_order_relaxed)) {
        if (paused_.load()) {
            park(vcpu);
            continue;
        }
        int err = vcpu.run();
        if (err == EINTR || err == EAGAIN) continue;
        if (err != 0) {
            log_msg("vCPU %u: KVM_RUN: %s (errno %d); stopping the VM", vcpu.id(), std::strerror(err), err);
            request_stop(1);
            break;
        }
        if (port80_absorber_) port80_absorber_->drain();  // queued POST codes first, so they stay in order with this exit
        DecodedExit exit = decode_exit(vcpu.run_state(), run_size);
        ExitOutcome out = handle_exit(exit, pio_, mmio_, vcpu.id());
        if (out.what == ExitOutcome::stop) {
            request_stop(out.status);
            break;
        }
        if (out.what == ExitOutcome::halt) {
            // Only without an in-kernel LAPIC does HLT come here: nothing can
            // wake this vCPU, so it is done. The VM ends when all are.
            if (halted_.fetch_add(1) + 1 == vcpus_.size()) request_stop(0);
            break;
        }
    }
}

void Machine::input_thread() {
    pollfd fds[2] = {{STDIN_FILENO, POLLIN, 0}, {stop_event_.get(), POLLIN, 0}};
    std::uint8_t buf[256];
    for (;;) {
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || (fds[1].revents & POLLIN)) return;
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t r = ::read(STDIN_FILENO, buf, sizeof buf);
            if (r < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (r <= 0) return;  // EOF (e.g. </dev/null) or error: no more input
            serial_->receive({buf, static_cast<std::size_t>(r)});
        }
    }
}

// ---- the control API's view of the VM (vmm/api.hpp) ------------------------------

namespace {
std::uint64_t vmm_rss_bytes() {
    // VmRSS of the whole process (guest RAM that is resident included).
    std::ifstream f("/proc/self/status");
    std::string key;
    while (f >> key) {
        if (key == "VmRSS:") {
            std::uint64_t kib = 0;
            f >> kib;
            return kib << 10;
        }
        f.ignore(1 << 20, '\n');
    }
    return 0;
}
} // namespace

class MachineControl : public VmControl {
public:
    explicit MachineControl(Machine& m) : m_(m) {}

    nlohmann::json info() override {
        nlohmann::json j = {
            {"name", m_.cfg_.name},
            {"state", m_.paused() ? "paused" : "running"},
            {"cpus", m_.cfg_.cpus},
            {"memory", m_.mem_.size()},
            {"backing", backing_name(m_.mem_.backing())},
            {"hugepage_backed_bytes", m_.mem_.huge_backed_bytes()},
            {"rss_bytes", m_.mem_.resident_bytes()},
            {"vmm_rss_bytes", vmm_rss_bytes()},
        };
        if (m_.balloon_)
            j["balloon"] = {{"target_bytes", std::uint64_t{m_.balloon_->target_pages()} << 12},
                            {"actual_bytes", std::uint64_t{m_.balloon_->actual_pages()} << 12}};
        return j;
    }

    nlohmann::json counters() override {
        nlohmann::json j;
        j["port80"] = {{"writes", m_.port80_->writes()}, {"reads", m_.port80_->reads()}, {"last_code", m_.port80_->last_code()}};
        for (std::size_t i = 0; i < m_.nets_.size(); ++i) {
            NetCounters c = m_.nets_[i]->counters();
            j["net" + std::to_string(i)] = {{"rx_packets", c.rx_packets}, {"rx_bytes", c.rx_bytes}, {"rx_dropped", c.rx_dropped},
                                            {"tx_packets", c.tx_packets}, {"tx_bytes", c.tx_bytes}, {"tx_dropped", c.tx_dropped}};
        }
        if (m_.balloon_) {
            // Ask for a fresh sample (5.5.6.3); this answer carries the last one.
            m_.balloon_->request_stats();
            BalloonCounters c = m_.balloon_->counters();
            nlohmann::json b = {{"inflated_pages", c.tracker.inflated_pages},
                                {"regions_released", c.tracker.regions_released},
                                {"released_bytes", c.tracker.bytes_released},
                                {"discarded_bytes", c.tracker.bytes_discarded},
                                {"reported_bytes", c.tracker.reported_bytes},
                                {"bad_pfns", c.tracker.bad_pfns},
                                {"bad_chains", c.bad_chains}};
            BalloonStats st = m_.balloon_->stats();
            if (st.valid) {
                // libvirt's virDomainMemoryStatTags names and units (KiB), as
                // `virsh dommemstat` prints them.
                nlohmann::json s;
                for (const auto& v : st.values) s[v.name] = v.libvirt_value;
                s["last_update"] = st.last_update_unix_s;
                b["stats"] = s;
            }
            j["balloon"] = b;
        }
        return j;
    }

    std::string resize(std::uint64_t desired_balloon_bytes) override {
        if (!m_.balloon_) return "this VM has no balloon (start it with --balloon)";
        if (desired_balloon_bytes > m_.mem_.size()) return "desired_balloon is larger than guest RAM";
        m_.balloon_->set_target_pages(static_cast<std::uint32_t>(desired_balloon_bytes >> 12));
        return "";
    }
    std::string pause() override {
        if (m_.paused()) return "already paused";
        return m_.pause() ? "" : "the vCPUs did not stop (is the VM stopping?)";
    }
    std::string resume() override {
        if (!m_.paused()) return "not paused";
        m_.resume();
        return "";
    }
    std::string shutdown() override {
        m_.request_stop(0);
        return "";
    }

private:
    Machine& m_;
};

int Machine::run() {
    // Stop signals go to a signalfd read by this thread only; every thread we
    // start inherits the blocked mask. The kick signal is blocked too except
    // inside vCPU threads, which unblock it.
    sigset_t sigs;
    sigemptyset(&sigs);
    for (int s : {SIGINT, SIGTERM, SIGHUP, kKickSignal}) sigaddset(&sigs, s);
    sigset_t old;
    if (int e = pthread_sigmask(SIG_BLOCK, &sigs, &old)) throw SysError("pthread_sigmask", e);
    struct sigaction sa {};
    sa.sa_handler = on_kick;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(kKickSignal, &sa, nullptr) != 0) throw_errno("sigaction");
    sigset_t stop_sigs = sigs;
    sigdelset(&stop_sigs, kKickSignal);
    int sfd = ::signalfd(-1, &stop_sigs, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) throw_errno("signalfd");
    Fd sig_fd(sfd);

    // The control API on its own thread (a client can never make a vCPU
    // wait), started before any thread so a socket error needs no cleanup.
    MachineControl control(*this);
    std::unique_ptr<ApiServer> api;
    if (cfg_.api_socket != "none")
        api = std::make_unique<ApiServer>(cfg_.api_socket.empty() ? socket_for(cfg_.name) : cfg_.api_socket, control);
    std::unique_ptr<RawTerminal> raw;
    if (cfg_.console == VmConfig::Console::stdio) {
        raw = std::make_unique<RawTerminal>(STDIN_FILENO);
        input_ = std::thread([this] { input_thread(); });
    }
    for (auto& v : vcpus_) threads_.emplace_back([this, &v] { vcpu_thread(v); });

    pollfd fds[2] = {{sfd, POLLIN, 0}, {stop_event_.get(), POLLIN, 0}};
    bool signalled = false;
    while (!stopping_.load()) {
        int n = ::poll(fds, 2, -1);
        if (n < 0 && errno != EINTR) {
            log_msg("poll: %s (errno %d); stopping the VM", std::strerror(errno), errno);
            request_stop(1);
        }
        if (n > 0 && (fds[0].revents & POLLIN)) {
            signalfd_siginfo si;
            if (::read(sfd, &si, sizeof si) == sizeof si) {
                log_msg("caught %s; stopping the VM", strsignal(static_cast<int>(si.ssi_signo)));
                request_stop(128 + static_cast<int>(si.ssi_signo));
                signalled = true;
            }
        }
    }
    for (auto& t : threads_) t.join();
    threads_.clear();
    if (input_.joinable()) input_.join();
    api.reset();
    raw.reset();
    pthread_sigmask(SIG_SETMASK, &old, nullptr);

    int status = status_.load();
    if (signalled)   // stopped from outside: where each vCPU was
        for (const auto& v : vcpus_) log_msg("vCPU %u: %s", v.id(), describe_vcpu(v).c_str());
    // Which KVM paravirt MSRs the guest turned on (kvm_para.h; bit 0 of each
    // is its enable bit): evidence, from outside, that a Linux guest uses
    // kvmclock, steal time, PV EOI and async page faults.
    {
        static constexpr std::pair<std::uint32_t, const char*> kPvMsrs[] = {
            {0x4b564d01, "kvmclock"}, {0x4b564d03, "steal-time"}, {0x4b564d04, "pv-eoi"}, {0x4b564d02, "async-pf"}};
        std::vector<std::uint32_t> idx;
        for (const auto& m : kPvMsrs) idx.push_back(m.first);
        std::string used;
        for (const auto& e : vcpus_[0].get_msrs(idx))
            for (const auto& m : kPvMsrs)
                if (m.first == e.index && (e.data & 1)) used += std::string(used.empty() ? "" : " ") + m.second;
        log_msg("vCPU 0 PV MSRs enabled by the guest: %s", used.empty() ? "none" : used.c_str());
    }
    log_msg("VM '%s' stopped with status %d; port 0x80: %llu writes (%s path), %llu reads, last code 0x%02x",
            cfg_.name.c_str(), status, static_cast<unsigned long long>(port80_->writes()),
            port80_->absorbed() ? "in-kernel" : "userspace", static_cast<unsigned long long>(port80_->reads()),
            port80_->last_code());
    for (std::size_t i = 0; i < nets_.size(); ++i) {
        NetCounters c = nets_[i]->counters();
        log_msg("virtio-net %zu: rx %llu packets (%llu dropped), tx %llu packets (%llu dropped); %llu MSI-X, %llu INTx interrupts",
                i, static_cast<unsigned long long>(c.rx_packets), static_cast<unsigned long long>(c.rx_dropped),
                static_cast<unsigned long long>(c.tx_packets), static_cast<unsigned long long>(c.tx_dropped),
                static_cast<unsigned long long>(virtio_[i]->msi_count()),
                static_cast<unsigned long long>(virtio_[i]->intx_count()));
    }
    return status;
}

} // namespace kguest
