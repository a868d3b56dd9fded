// Building a VM (see machine.hpp), in order: load the kernel, open KVM and
// check what we rely on, create the VM with its in-kernel irqchip and PIT, map
// guest RAM, plug the devices into the buses, and set up the vCPUs.
#include "vmm/machine.hpp"
#include "devices/base/error.hpp"
#include "devices/base/log.hpp"
#include "devices/virtio_blk.hpp"
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
    const FileImage image = read_file(cfg.kernel, mem.size());
    std::optional<FileImage> initrd;
    if (!cfg.initrd.empty()) initrd.emplace(read_file(cfg.initrd, mem.size()));
    AcpiConfig acpi;
    acpi.cpus = cfg.cpus;
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

// Opens, checks and locks every --disk image (UsageError naming it).
std::vector<std::unique_ptr<BlockImage>> open_images(const VmConfig& cfg) {
    std::vector<std::unique_ptr<BlockImage>> images;
    for (const DiskConfig& d : cfg.disks) images.push_back(std::make_unique<BlockImage>(d));
    return images;
}
} // namespace

Machine::Machine(const VmConfig& cfg)
    : cfg_(cfg),
      mem_(cfg.memory, cfg.backing),
      boot_(boot_guest(mem_, cfg)),
      images_(open_images(cfg)),
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

    std::uint32_t slot = 0;
    for (const auto& r : mem_.regions())
        vm_.set_user_memory_region(slot++, r.gpa.value(), r.size, mem_.host_address_for_kvm(r));

    // The legacy devices, from the board table; the console goes to stdout, a file, or nowhere.
    LegacyWiring wiring;
    wiring.console_fd = cfg.console == VmConfig::Console::stdio ? STDOUT_FILENO : -1;
    if (cfg.console == VmConfig::Console::file) {
        wiring.console_fd = ::open(cfg.console_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (wiring.console_fd < 0)
            throw UsageError("--console " + cfg.console_path + ": " + std::strerror(errno));
        console_file_ = Fd(wiring.console_fd);
    }
    wiring.irq_line = [this](unsigned irq, bool level) { return vm_.irq_line(irq, level); };
    wiring.stop = [this](int status) { loop_.request_stop(status); };
    wiring.power_off = [this] {
        log_msg("guest powered off (ACPI S5)");
        loop_.request_stop(0);
    };
    wiring.reset = [this] {   // kguest, like Firecracker, does not restart guests
        log_msg("guest reset the machine (reboot); ending the VM");
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
                d.discard ? ", discard" : "", pci_slot.ioeventfds() ? "by ioeventfd" : "by MMIO exit");
        disks_.push_back({std::move(dev), &pci_slot});
    }
    images_.clear();

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
}

Machine::~Machine() = default;

VirtioPciSlot& Machine::add_virtio(std::shared_ptr<VirtioDevice> dev, std::uint32_t class_code) {
    const unsigned slot = static_cast<unsigned>(virtio_.size()) + 1;
    const std::uint64_t bar = virtio_bar(slot);
    virtio_.push_back(std::make_unique<VirtioPciSlot>(vm_, *gsi_router_, mmio_, mem_, *legacy_.pci, std::move(dev),
                                                      class_code, slot, bar));
    return *virtio_.back();
}

} // namespace kguest
