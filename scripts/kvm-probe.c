/* kvm-probe: does /dev/kvm really run a guest?
 *
 * scripts/sandbox uses this twice: on the host, to decide whether CMD can run
 * directly, and inside the sandbox VM, to prove that nested KVM came up before
 * CMD starts. A /dev/kvm node is not enough (it can exist while every
 * KVM_CREATE_VM fails), so we create a VM and one vCPU and run a two-byte
 * real-mode guest, "out 0x80, al; hlt", expecting exactly those two exits.
 * Static C, no project code: it is built before (and apart from) the project.
 * Exit status 0 = usable; otherwise one line on stderr says which step failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static int fail(const char *what) {
    fprintf(stderr, "kvm-probe: %s: %s (errno %d)\n", what, strerror(errno), errno);
    return 1;
}

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) return fail("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) return fail("KVM_GET_API_VERSION");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0) return fail("KVM_CREATE_VM");
    unsigned char *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return fail("mmap");
    static const unsigned char code[] = {0xe6, 0x80, 0xf4}; /* out 0x80, al; hlt */
    memcpy(mem, code, sizeof code);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0x1000, .memory_size = 0x1000, .userspace_addr = (unsigned long)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) return fail("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0) return fail("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < 0) return fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) return fail("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) return fail("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = 0x1000, .rax = 0x5a, .rflags = 0x2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) return fail("KVM_SET_REGS");
    if (ioctl(vcpu, KVM_RUN, 0) < 0) return fail("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x80 ||
        ((unsigned char *)run)[run->io.data_offset] != 0x5a) {
        fprintf(stderr, "kvm-probe: first exit %u, expected KVM_EXIT_IO on port 0x80\n", run->exit_reason);
        return 1;
    }
    if (ioctl(vcpu, KVM_RUN, 0) < 0) return fail("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_HLT) {
        fprintf(stderr, "kvm-probe: second exit %u, expected KVM_EXIT_HLT\n", run->exit_reason);
        return 1;
    }
    return 0;
}
