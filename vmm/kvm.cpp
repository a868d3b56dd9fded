// Thin, checked wrappers over the KVM ioctls (Documentation/virt/kvm/api.rst).
#include "vmm/kvm.hpp"
#include "devices/base/error.hpp"

#include <cerrno>
#include <fcntl.h>
#include <memory>
#include <sys/ioctl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>

namespace kguest {

Fd make_eventfd() {
    int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) throw_errno("eventfd");
    return Fd(fd);
}

namespace {

// ioctl() that retries on EINTR and throws SysError(name) on failure.
template <typename Arg>
int xioctl(int fd, unsigned long req, const char* name, Arg arg) {
    int r;
    do {
        r = ::ioctl(fd, req, arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0) throw_errno(name);
    return r;
}

int check_ext(int fd, long cap) {
    int r = ::ioctl(fd, KVM_CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
}

// A KVM_GET_* ioctl that fills one struct.
template <typename T>
T xget(int fd, unsigned long req, const char* name) {
    T v{};
    xioctl(fd, req, name, &v);
    return v;
}

} // namespace

Kvm::Kvm(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw_errno("open " + path);
    fd_ = Fd(fd);
    int version = xioctl(fd, KVM_GET_API_VERSION, "KVM_GET_API_VERSION", 0);
    if (version != KVM_API_VERSION)
        throw std::runtime_error("KVM_GET_API_VERSION: got " + std::to_string(version) +
                                 ", need " + std::to_string(KVM_API_VERSION));
}

int Kvm::check_extension(long cap) const { return check_ext(fd_.get(), cap); }

void Kvm::require_extension(long cap, const char* name) const {
    if (check_extension(cap) <= 0)
        throw std::runtime_error(std::string("KVM_CHECK_EXTENSION: host KVM lacks ") + name);
}

std::size_t Kvm::vcpu_mmap_size() const {
    return static_cast<std::size_t>(
        xioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE", 0));
}

std::vector<kvm_cpuid_entry2> Kvm::supported_cpuid() const {
    // The ioctl fails with E2BIG until the buffer is big enough; grow and retry.
    for (std::uint32_t n = 64; n <= 4096; n *= 2) {
        std::size_t bytes = sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2);
        auto buf = std::make_unique<std::uint64_t[]>((bytes + 7) / 8);
        auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buf.get());
        cpuid->nent = n;
        if (::ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
            return {cpuid->entries, cpuid->entries + cpuid->nent};
        if (errno != E2BIG) throw_errno("KVM_GET_SUPPORTED_CPUID");
    }
    throw SysError("KVM_GET_SUPPORTED_CPUID", E2BIG);
}

Vm Kvm::create_vm() const {
    int fd = xioctl(fd_.get(), KVM_CREATE_VM, "KVM_CREATE_VM", 0UL);
    Fd owned(fd);
    return Vm(std::move(owned), vcpu_mmap_size());
}

int Vm::check_extension(long cap) const { return check_ext(fd_.get(), cap); }

void Vm::set_user_memory_region(std::uint32_t slot, std::uint64_t gpa, std::uint64_t size,
                                void* host, std::uint32_t flags) {
    kvm_userspace_memory_region r{slot, flags, gpa, size, reinterpret_cast<std::uint64_t>(host)};
    xioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &r);
}

void Vm::set_tss_addr(std::uint64_t addr) {
    xioctl(fd_.get(), KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", static_cast<unsigned long>(addr));
}

void Vm::set_identity_map_addr(std::uint64_t addr) {
    xioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", &addr);
}

void Vm::create_irqchip() { xioctl(fd_.get(), KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP", 0); }

void Vm::create_pit2() {
    kvm_pit_config cfg{};
    // KVM_PIT_SPEAKER_DUMMY: port 0x61 reads are answered in the kernel too.
    cfg.flags = KVM_PIT_SPEAKER_DUMMY;
    xioctl(fd_.get(), KVM_CREATE_PIT2, "KVM_CREATE_PIT2", &cfg);
}

void Vm::ioeventfd(const kvm_ioeventfd& spec) {
    xioctl(fd_.get(), KVM_IOEVENTFD, "KVM_IOEVENTFD", &spec);
}

int Vm::try_ioeventfd(const kvm_ioeventfd& spec) noexcept {
    return ::ioctl(fd_.get(), KVM_IOEVENTFD, &spec) < 0 ? errno : 0;
}

void Vm::irqfd(int eventfd, std::uint32_t gsi) {
    kvm_irqfd spec{static_cast<std::uint32_t>(eventfd), gsi, 0, 0, {}};
    xioctl(fd_.get(), KVM_IRQFD, "KVM_IRQFD", &spec);
}

int Vm::set_gsi_routing(const std::vector<kvm_irq_routing_entry>& entries) noexcept {
    // struct kvm_irq_routing ends in a flexible array: one allocation for both.
    std::vector<std::uint64_t> buf((sizeof(kvm_irq_routing) + entries.size() * sizeof(kvm_irq_routing_entry) + 7) / 8);
    auto* table = reinterpret_cast<kvm_irq_routing*>(buf.data());
    table->nr = static_cast<std::uint32_t>(entries.size());
    std::copy(entries.begin(), entries.end(), table->entries);
    return ::ioctl(fd_.get(), KVM_SET_GSI_ROUTING, table) < 0 ? errno : 0;
}

void Vm::register_coalesced_pio(std::uint16_t port, std::uint32_t len) {
    kvm_coalesced_mmio_zone zone{};
    zone.addr = port;
    zone.size = len;
    zone.pio = 1;
    xioctl(fd_.get(), KVM_REGISTER_COALESCED_MMIO, "KVM_REGISTER_COALESCED_MMIO", &zone);
}

int Vm::irq_line(std::uint32_t irq, bool level) noexcept {
    kvm_irq_level l{{irq}, level ? 1u : 0u};
    return ::ioctl(fd_.get(), KVM_IRQ_LINE, &l) < 0 ? errno : 0;
}

Vcpu Vm::create_vcpu(unsigned id) const {
    int fd = xioctl(fd_.get(), KVM_CREATE_VCPU, "KVM_CREATE_VCPU", static_cast<unsigned long>(id));
    Fd owned(fd);
    void* run = ::mmap(nullptr, vcpu_mmap_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (run == MAP_FAILED) throw_errno("mmap kvm_run");
    return Vcpu(std::move(owned), Mapping(run, vcpu_mmap_size_), id);
}

int Vcpu::run() { return ::ioctl(fd_.get(), KVM_RUN, 0) < 0 ? errno : 0; }

kvm_regs Vcpu::get_regs() const { return xget<kvm_regs>(fd_.get(), KVM_GET_REGS, "KVM_GET_REGS"); }

void Vcpu::set_regs(const kvm_regs& r) { xioctl(fd_.get(), KVM_SET_REGS, "KVM_SET_REGS", &r); }

kvm_sregs Vcpu::get_sregs() const { return xget<kvm_sregs>(fd_.get(), KVM_GET_SREGS, "KVM_GET_SREGS"); }

void Vcpu::set_sregs(const kvm_sregs& s) { xioctl(fd_.get(), KVM_SET_SREGS, "KVM_SET_SREGS", &s); }

void Vcpu::set_fpu(const kvm_fpu& f) { xioctl(fd_.get(), KVM_SET_FPU, "KVM_SET_FPU", &f); }

void Vcpu::set_cpuid(const std::vector<kvm_cpuid_entry2>& entries) {
    std::size_t bytes = sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2);
    auto buf = std::make_unique<std::uint64_t[]>((bytes + 7) / 8);
    auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buf.get());
    cpuid->nent = static_cast<std::uint32_t>(entries.size());
    std::copy(entries.begin(), entries.end(), cpuid->entries);
    xioctl(fd_.get(), KVM_SET_CPUID2, "KVM_SET_CPUID2", cpuid);
}

std::vector<kvm_msr_entry> Vcpu::get_msrs(const std::vector<std::uint32_t>& indices) const {
    std::size_t bytes = sizeof(kvm_msrs) + indices.size() * sizeof(kvm_msr_entry);
    auto buf = std::make_unique<std::uint64_t[]>((bytes + 7) / 8);
    auto* m = reinterpret_cast<kvm_msrs*>(buf.get());
    m->nmsrs = static_cast<std::uint32_t>(indices.size());
    for (std::size_t i = 0; i < indices.size(); ++i) m->entries[i] = kvm_msr_entry{indices[i], 0, 0};
    int n = ::ioctl(fd_.get(), KVM_GET_MSRS, m);
    if (n < 0) return {};
    return {m->entries, m->entries + n};
}

kvm_lapic_state Vcpu::get_lapic() const {
    return xget<kvm_lapic_state>(fd_.get(), KVM_GET_LAPIC, "KVM_GET_LAPIC");
}

void Vcpu::set_lapic(const kvm_lapic_state& l) { xioctl(fd_.get(), KVM_SET_LAPIC, "KVM_SET_LAPIC", &l); }

} // namespace kguest
