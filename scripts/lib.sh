# Shared shell helpers for scripts/{sandbox,test,demo}. Source it; do not run it.

KGUEST_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KGUEST_CACHE=${KGUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kguest}

# die MSG: one clear line on stderr, exit status 2 (or $2).
die() { echo "${0##*/}: $1" >&2; exit "${2:-2}"; }

# need_packages PKG...: apt-get install whatever of PKG... is not installed.
# Idempotent and quiet when everything is there; needs root only when it must
# install.
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}); run as root or install them with apt-get"
    echo "${0##*/}: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A stale or empty package list makes installs fail: refresh it once first.
    apt-get update -qq >&2 || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 \
        || die "apt-get install ${missing[*]} failed"
}

# Packages the build and unit tests need.
BUILD_PACKAGES=(build-essential cmake ninja-build ccache libgtest-dev liburing-dev pkg-config
                libboost-dev nlohmann-json3-dev libseccomp-dev acpica-tools)
# Packages the fuzz targets need (scripts/test): clang and its libFuzzer and
# sanitizer runtimes (Debian 12 packages these in libclang-rt-14-dev).
FUZZ_PACKAGES=(clang libclang-rt-14-dev)
# Packages the sandbox needs: QEMU (TCG), Debian's kernel with its KVM modules,
# a static busybox for the initramfs, and cpio to pack it.
SANDBOX_PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static cpio gcc libc6-dev)
# Packages the network tests use: ip (TAP setup), ping, and passt (the
# unprivileged backend's far end).
NET_PACKAGES=(iproute2 iputils-ping passt curl procps)

# newest_kernel: the newest /boot/vmlinuz-V that has /lib/modules/V, the
# kernel the Linux guest scripts boot by default. initramfs_for KERNEL: the
# scripts/linux-initramfs image for KERNEL's modules (cached). Both print a
# path, or die with the reason (in their subshell: call them as
# `x=$(newest_kernel) || exit 2`).
newest_kernel() {
    local k
    for k in $(ls -v /boot/vmlinuz-* 2>/dev/null | tac); do
        [ -d "/lib/modules/${k#/boot/vmlinuz-}" ] && { echo "$k"; return 0; }
    done
    die "no /boot/vmlinuz-V with /lib/modules/V (apt-get install linux-image-amd64)"
}
initramfs_for() {
    local kver
    kver=$(basename "$1"); kver=${kver#vmlinuz-}
    [ -d "/lib/modules/$kver" ] || die "cannot tell $1's modules (name it vmlinuz-V with /lib/modules/V, or pass --initrd)"
    "$KGUEST_ROOT/scripts/linux-initramfs" --kernel-version "$kver" || die "building the initramfs failed" 1
}

# pvh_vmlinux BZIMAGE: the path of the ELF vmlinux inside Debian's
# xz-compressed bzImage, unpacked once into the cache. QEMU (and kguest) boot
# it through its PVH entry (the kernel has CONFIG_PVH) with no decompression,
# which under TCG takes ~4 s. Fails when there is no xz payload or no ELF in it.
pvh_vmlinux() {
    local kernel=$1 kver vmlinux off
    kver=$(basename "$kernel"); kver=${kver#vmlinuz-}
    vmlinux=$KGUEST_CACHE/vmlinux-$kver
    if [ ! -s "$vmlinux" ] || [ "$kernel" -nt "$vmlinux" ]; then
        mkdir -p "$KGUEST_CACHE"
        off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$kernel" 2>/dev/null | head -n 1 | cut -d: -f1 || true)
        if [ -n "$off" ] && tail -c +$((off + 1)) "$kernel" > "$vmlinux.xz" \
            && xz -dcq --single-stream "$vmlinux.xz" > "$vmlinux.tmp" 2>/dev/null \
            && [ "$(head -c 4 "$vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
            mv "$vmlinux.tmp" "$vmlinux"
        fi
        rm -f "$vmlinux.tmp" "$vmlinux.xz"
    fi
    [ -s "$vmlinux" ] && echo "$vmlinux"
}

# For the benchmarks: field LINE KEY prints the value of KEY=... in a guest
# `RESULT name k=v ...` line; median prints the median of the numbers on stdin.
field() { sed -nE "s/.* $2=([^ ]+).*/\1/p" <<<"$1"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# bench_row FIGURE KGUEST PEER RATIO GOAL VERDICT: one summary row for
# scripts/bench (tab-separated; "-" where a column does not apply).
bench_row() { printf 'BENCH\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@"; }
# vmm_cpu_ticks PID: user + system clock ticks of a running VMM, all threads,
# from /proc/PID/stat. Fails, printing nothing, once the process has ended
# (its entry gone when bash reaped it, or a zombie): a measurement window it
# did not run through would give a bogus figure.
vmm_cpu_ticks() {
    local s f
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a f <<<"${s##*) }"   # fields from 3 (state) on; comm may hold spaces
    case ${f[0]:-X} in Z|X|x) return 1 ;; esac
    echo $(( f[11] + f[12] ))   # fields 14 (utime) and 15 (stime)
}
# vmm_ended NAME PID WHEN STDERR CONSOLE: die saying that the VMM NAME (PID, a
# child of this shell) ended WHEN, with its exit status and the last lines of
# its stderr and console files. For a VMM gone before a measurement finished.
vmm_ended() {
    local rc=0
    wait "$2" 2>/dev/null || rc=$?
    {
        echo "${0##*/}: $1 (pid $2) ended $3, exit status $rc; no figure from this run"
        echo "  its stderr, last lines:"; tail -n 5 "$4" 2>/dev/null | tr -d '\r' | sed 's/^/    /' || true
        echo "  its console, last lines:"; tail -n 5 "$5" 2>/dev/null | tr -d '\r' | sed 's/^/    /' || true
    } >&2
    exit 1
}

# configure_and_build [BUILD_DIR] [extra cmake args...]
configure_and_build() {
    local dir=${1:-$KGUEST_ROOT/build}
    shift || true
    cmake -S "$KGUEST_ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKGUEST_WERROR=ON \
        -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache "$@" >/dev/null \
        || die "cmake configure failed" 1
    cmake --build "$dir" -j"$(nproc)" || die "build failed" 1
}
# Packages scripts/tlb-overhead uses: gnuplot for its PNG plot.
TLB_PACKAGES=(gnuplot-nox)
# Packages the stock-Linux guest scripts (linux-initramfs, linux-boot-bench)
# use: Debian's kernel with its modules, a static busybox, cpio and kmod
# (modinfo) to pack the initramfs.
LINUX_PACKAGES=(linux-image-amd64 busybox-static cpio kmod)
# Packages scripts/linux-rootfs uses: a static busybox and mkfs.ext4 (e2fsck
# too, which the Linux disk tests run on the image afterwards).
ROOTFS_PACKAGES=(busybox-static e2fsprogs)
