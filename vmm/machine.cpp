// Building a VM (see machine.hpp), in order: load the kernel, open and lock
// the disk images, open KVM and check what we rely on, create the VM with its
// in-kernel irqchip and PIT, map guest RAM, plug the devices into the buses,
// and set up the vCPUs.
#include "vmm/machine.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/base/timeline.hpp"
#include "devices/virtio_blk.hpp"
#include "devices/virtio_mem.hpp"
#include "devices/virtio_net.hpp"
#include "vmm/acpi.hpp"
#include "vmm/boot_cpu.hpp"
#include "vmm/port80_kvm.hpp"
#include "vmm/virtio_kvm.hpp"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <optional>
#include <unistd.h>

namespace kguest {

namespace {
// Reads the kernel (and initrd), writes the ACPI tables, picks the command
// line and loads it all into guest RAM. Errors name the file.
BootPlan boot_guest(GuestMemory& mem, const VmConfig& cfg) {
    boot_step(BootStep::ram_mapped);
    const FileImage image = read_file(cfg.kernel, mem.size());
    std::optional<FileImage> initrd;
    if (!cfg.initrd.empty()) initrd.emplace(read_file(cfg.initrd, mem.size()));
    AcpiConfig acpi;
    acpi.cpus = cfg.cpus;
    const std::uint64_t rsdp = write_acpi_tables(mem, acpi);
    // With virtio-mem, Linux onlines hot-added memory by itself, and as
    // ZONE_MOVABLE so that it can be unplugged again (Debian builds no
    // MEMORY_HOTPLUG_DEFAULT_ONLINE; Documentation/admin-guide/mm/memory-hotplug.rst).
    const std::string defaults = std::string(KGUEST_LINUX_CMDLINE) +
                                 (mem.hotplug_region() != nullptr ? " memhp_default_state=online_movable" : "");
    const std::string linux_cmdline = cfg.default_cmdline
        ? defaults + (cfg.cmdline.empty() ? "" : " " + cfg.cmdline) : cfg.cmdline;
    try {
        // A Linux kernel (bzImage, or a vmlinux with Linux's ELF notes) gets
        // the default command line; our own guest gets --cmdline as it is.
        BootPlan plan = load_kernel(mem, image.bytes(), initrd ? initrd->bytes() : std::span<const std::uint8_t>(),
                                    is_linux_kernel(image.bytes()) ? linux_cmdline : cfg.cmdline, rsdp);
        boot_step(BootStep::kernel_loaded);
        return plan;
    } catch (const UsageError& e) {
        throw UsageError(cfg.kernel + ": " + e.what());
    }
}

// Opens, checks and locks every --disk image (UsageError naming it).
std::vector<std::unique_ptr<BlockImage>> open_images(const VmConfig& cfg) {
    std::vector<std::unique_ptr<BlockImage>> images;
    for (const DiskConfig& d : cfg.disks) images.push_back(std::make_unique<BlockImage>(d));
    return images;
}
// The --rng source, opened for reading (UsageError naming it); none without --rng.
Fd open_rng_source(const VmConfig& cfg) {
    if (!cfg.rng) return Fd();
    const std::string src = cfg.rng->empty() ? VirtioRng::kDefaultSource : *cfg.rng;
    const int fd = ::open(src.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) throw UsageError("--rng src=" + src + ": " + std::strerror(errno));
    return Fd(fd);
}
} // namespace

Machine::Machine(const VmConfig& cfg)
    : cfg_(cfg),
      mem_(cfg.memory, cfg.backing, cfg.memory_max > cfg.memory ? cfg.memory_max - cfg.memory : 0),
      boot_(boot_guest(mem_, cfg)),
      images_(open_images(cfg)),
      rng_source_(open_rng_source(cfg)),
      kvm_(),
      vm_(kvm_.create_vm()),
      loop_(vcpus_, kvm_.vcpu_mmap_size(), pio_, mmio_, [this] {
          // Queued POST codes first, so they stay in order with this exit.
          if (port80_absorber_) port80_absorber_->drain();
      }) {
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

    vm_.set_tss_addr(kTssAddr);   // KVM's pages, vmm/board.hpp
    vm_.set_identity_map_addr(kIdentityMapAddr);
    vm_.create_irqchip();
    vm_.create_pit2();
    boot_step(BootStep::kvm_ready);

    std::uint32_t slot = 0;
    for (const auto& r : mem_.regions())
        vm_.set_user_memory_region(slot++, r.gpa.value(), r.size, mem_.host_address_for_kvm(r));
    // The virtio-mem region: a slot of its own, outside E820 (VIRTIO 1.2 5.15:
    // "not exposed as RAM via other firmware / hw interfaces (e.g., e820 on x86)").
    if (const MemoryRegion* h = mem_.hotplug_region())
        vm_.set_user_memory_region(slot++, h->gpa.value(), h->size, mem_.host_address_for_kvm(*h));

    // The legacy devices, from the board table; the console goes to stdout,
    // a file, a PTY, a socket's client or nowhere (vmm/console.hpp).
    LegacyWiring wiring;
    console_ = std::make_unique<ConsoleBackend>(cfg.console, cfg.console_path);
    wiring.console_fd = console_->output_fd();
    wiring.irq_line = [this](unsigned irq, bool level) { return vm_.irq_line(irq, level); };
    wiring.stop = [this](int status) { loop_.request_stop(status); };
    wiring.power_off = [this] {
        log_msg("guest powered off (ACPI S5)");
        loop_.request_stop(0);
    };
    wiring.reset = [this] {
        // The VM ends; `kguest run` ends with it (as in Firecracker), while the
        // API lifecycle boots it again (as Cloud Hypervisor does).
        log_msg("guest reset the machine (reboot); ending the VM");
        reset_by_guest_ = true;
        loop_.request_stop(0);
    };
    for (const auto& r : mem_.regions()) (r.gpa.value() < kHighRamStart ? wiring.ram_below_4g : wiring.ram_above_4g) += r.size;
    legacy_ = make_legacy_devices(wiring);
    insert_pio_devices(pio_, legacy_);
    gsi_router_ = std::make_unique<GsiRouter>(vm_);

    // virtio-net devices (VIRTIO 1.2 5.1), class 0x020000 (Ethernet).
    for (const auto& n : cfg.nets) {
        auto dev = std::make_shared<VirtioNet>(open_backend(n), n.mac);
        auto& pci_slot = add_virtio(dev, 0x020000);
        log_msg("virtio-net %s on %s %s at PCI 00:%02x.0, %u queue pair(s), kicks %s", format_mac(n.mac).c_str(),
                n.kind == NetConfig::Kind::tap ? "TAP" : "stream", n.target.c_str(), static_cast<unsigned>(virtio_.size()),
                dev->queue_pairs(), pci_slot.ioeventfds() ? "by ioeventfd" : "by MMIO exit");
        dev->set_thread_name("net" + std::to_string(nets_.size()));
        nets_.push_back({std::move(dev), &pci_slot});
    }

    // virtio-blk devices (VIRTIO 1.2 5.2), class 0x010000 (SCSI storage) as QEMU's.
    for (std::size_t i = 0; i < cfg.disks.size(); ++i) {
        const DiskConfig& d = cfg.disks[i];
        auto dev = std::make_shared<VirtioBlk>(std::move(images_[i]), d.queues, d.discard);
        auto& pci_slot = add_virtio(dev, 0x010000);
        const BlockImage& img = dev->image();
        log_msg("virtio-blk %s at PCI 00:%02x.0, %llu bytes%s, %u queue(s), block size %u, cache=%s%s, kicks %s",
                img.path().c_str(), static_cast<unsigned>(virtio_.size()), static_cast<unsigned long long>(img.size()),
                img.readonly() ? " read-only" : "", d.queues, img.block_size(), img.direct() ? "none" : "writeback",
                (dev->device_features() & virtio_bit(VIRTIO_BLK_F_DISCARD)) != 0 ? ", discard" : "", pci_slot.ioeventfds() ? "by ioeventfd" : "by MMIO exit");
        dev->set_thread_name("disk" + std::to_string(disks_.size()));
        disks_.push_back({std::move(dev), &pci_slot});
    }
    images_.clear();

    // virtio-balloon (VIRTIO 1.2 5.5), class 0xff0000 as QEMU's.
    if (cfg.balloon) {
        balloon_ = std::make_shared<VirtioBalloon>(mem_, cfg.balloon_options);
        add_virtio(balloon_, 0xff0000);
        balloon_->set_thread_name("balloon");
        log_msg("virtio-balloon at PCI 00:%02x.0 (stats, deflate-on-OOM, free page reporting)",
                static_cast<unsigned>(virtio_.size()));
    }
    // virtio-mem (VIRTIO 1.2 5.15), class 0xff0000 as QEMU's virtio-mem-pci.
    if (mem_.hotplug_region() != nullptr) {
        virtio_mem_ = std::make_shared<VirtioMem>(mem_);
        add_virtio(virtio_mem_, 0xff0000);
        virtio_mem_->set_thread_name("mem");
        const MemoryRegion& h = *mem_.hotplug_region();
        log_msg("virtio-mem at PCI 00:%02x.0: %llu MiB at 0x%llx in 2 MiB blocks, up to %llu MiB plugged",
                static_cast<unsigned>(virtio_.size()), static_cast<unsigned long long>(h.size >> 20),
                static_cast<unsigned long long>(h.gpa.value()),
                static_cast<unsigned long long>((cfg.memory_max > mem_.size() ? cfg.memory_max - mem_.size() : 0) >> 20));
    }
    // virtio-rng (VIRTIO 1.2 5.4), class 0xff0000 as QEMU's virtio-rng-pci.
    if (cfg.rng) {
        const std::string src = cfg.rng->empty() ? VirtioRng::kDefaultSource : *cfg.rng;
        rng_ = std::make_shared<VirtioRng>(std::move(rng_source_), cfg.rng_limit);
        add_virtio(rng_, 0xff0000);
        rng_->set_thread_name("rng");
        log_msg("virtio-rng at PCI 00:%02x.0 from %s, %s", static_cast<unsigned>(virtio_.size()), src.c_str(),
                cfg.rng_limit.rate == 0 ? "no rate limit"
                                        : ("at most " + std::to_string(cfg.rng_limit.rate) + " bytes/s").c_str());
    }
    if (cfg.prefault) mem_.prefault();

    // vCPUs: all get CPUID, FPU and LAPIC setup; only the BSP gets registers.
    // The APs sit in wait-for-SIPI inside KVM until the guest starts them.
    auto supported = kvm_.supported_cpuid();
    CpuidOptions opt;
    opt.cpus = cfg.cpus;
    opt.tsc_deadline = kvm_.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
    opt.pv_features = pv_features_to_offer(cfg.pv_spinlocks);
    for (unsigned i = 0; i < cfg.cpus; ++i) {
        vcpus_.push_back(vm_.create_vcpu(i));
        opt.vcpu_id = i;
        setup_vcpu(vcpus_.back(), supported, opt);
    }
    setup_boot_cpu(vcpus_[0], mem_, boot_);

    // Port 0x80's in-kernel path (vmm/port80_kvm.hpp).
    if (cfg.port80 == VmConfig::Port80Mode::kernel) {
        port80_absorber_ = std::make_unique<Port80Absorber>(*legacy_.port80);
        if (!port80_absorber_->absorb(kvm_, vm_, vcpus_[0])) port80_absorber_.reset();
    }
    boot_step(BootStep::vm_built);
}

Machine::~Machine() = default;

void Machine::press_power_button() {
    log_msg("power button pressed");
    legacy_.acpi_pm->press_power_button();
}

VirtioPciSlot& Machine::add_virtio(std::shared_ptr<VirtioDevice> dev, std::uint32_t class_code) {
    const unsigned slot = static_cast<unsigned>(virtio_.size()) + 1;
    const std::uint64_t bar = virtio_bar(slot);
    virtio_.push_back(std::make_unique<VirtioPciSlot>(vm_, *gsi_router_, mmio_, mem_, *legacy_.pci, std::move(dev),
                                                      class_code, slot, bar));
    return *virtio_.back();
}

} // namespace kguest
