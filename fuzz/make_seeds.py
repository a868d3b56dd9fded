#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/NAME/ (committed; rerun after
changing how a target reads its input). Each seed is a small valid input: a
well-formed ring or driver sequence, an image the loader accepts, an HTTP
request per route. The script-driven targets read their input through
libFuzzer's FuzzedDataProvider, which takes byte strings from the front and
integers from the back (the first integer is the last bytes, most significant
byte first); Fdp below writes the same layout."""
import os
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


class Fdp:
    def __init__(self):
        self.front = bytearray()
        self.back = bytearray()   # in the order the target reads it

    def int(self, lo, hi, v):   # ConsumeIntegralInRange(lo, hi) returning v
        rng, n = hi - lo, 0
        while n * 8 < 64 and (rng >> (n * 8)) > 0:
            n += 1
        self.back += (v - lo).to_bytes(n, "big") if n else b""
        return self

    def u(self, bits, v):   # ConsumeIntegral<uintN_t>
        return self.int(0, (1 << bits) - 1, v)

    def bool(self, v):
        return self.u(8, 1 if v else 0)

    def bytes(self, b):   # ConsumeBytes(len(b))
        self.front += b
        return self

    def data(self):
        return bytes(self.front) + bytes(reversed(self.back))


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def put(ram, off, b):
    ram[off:off + len(b)] = b


NEXT, WRITE, INDIRECT = 1, 2, 4


# --- virtqueue: rings at 0x1000 / 0x2000 / 0x3000 of the fuzzer's RAM window.
def vq_seed(size_log2, event_idx, indirect, ram, ops):
    f = Fdp().int(0, 16, size_log2).bool(True).bool(event_idx).bool(indirect)
    for a in (0x1000, 0x2000, 0x3000):
        f.int(0, 7, 3).int(0, 0x10000, a)
    f.int(0, 0x10000, len(ram)).bytes(bytes(ram))
    for op in ops:
        op(f)
    return f.data()


def vq_pop(f, push=True):
    f.int(0, 7, 0).u(32, 0).int(0, 512, 64).u(32, 0)
    f.bool(push)
    if push:
        f.u(32, 16)


def vq_service(f):
    f.int(0, 7, 2).int(1, 64, 8)


def vq_notify(f):
    f.int(0, 7, 4)


def vq_ram(chains, indirect_table=None):
    ram = bytearray(0x2010)
    i = 0
    heads = []
    for chain in chains:
        heads.append(i)
        for k, (addr, length, w) in enumerate(chain):
            last = k == len(chain) - 1
            put(ram, 0x1000 + 16 * i, desc(addr, length, (WRITE if w else 0) | (0 if last else NEXT), 0 if last else i + 1))
            i += 1
    if indirect_table is not None:
        heads.append(i)
        put(ram, 0x1000 + 16 * i, desc(0x1800, 16 * len(indirect_table), INDIRECT))
        for k, (addr, length, w) in enumerate(indirect_table):
            last = k == len(indirect_table) - 1
            put(ram, 0x1800 + 16 * k, desc(addr, length, (WRITE if w else 0) | (0 if last else NEXT), 0 if last else k + 1))
    put(ram, 0x2000, struct.pack("<HH", 0, len(heads)))
    for k, h in enumerate(heads):
        put(ram, 0x2004 + 2 * k, struct.pack("<H", h))
    return ram


def virtqueue():
    one = vq_ram([[(0x4000, 64, False), (0x5000, 64, True)]])
    yield "one_chain", vq_seed(3, False, False, one, [vq_pop, vq_notify])
    many = vq_ram([[(0x4000 + 0x100 * k, 32, False), (0x6000 + 0x100 * k, 32, True)] for k in range(3)])
    yield "three_chains_service", vq_seed(3, True, False, many, [vq_service, vq_notify, vq_service])
    ind = vq_ram([], indirect_table=[(0x4000, 16, False), (0x5000, 128, True)])
    yield "indirect", vq_seed(2, False, True, ind, [vq_pop, vq_notify])
    loop = bytearray(0x2010)
    put(loop, 0x1000, desc(0x4000, 8, NEXT, 1))
    put(loop, 0x1010, desc(0x4000, 8, NEXT, 0))   # a loop: refused
    put(loop, 0x2000, struct.pack("<HHH", 0, 1, 0))
    yield "loop_refused", vq_seed(1, False, False, loop, [vq_pop, lambda f: f.int(0, 7, 7), vq_pop])


# --- virtio_pci: the script ops of virtio_pci_fuzz.cpp.
def pci_ram():
    ram = bytearray(0x1210)
    put(ram, 0x1000, desc(0x3000, 16, 0))
    put(ram, 0x1100, struct.pack("<HHH", 0, 1, 0))
    return ram


def pci_bar(f, write, region, off, size_index, value=0):
    f.int(0, 9, 5 if write else 4).int(0, 7, 1).int(0, 7, region).int(0, 0x40, off)
    f.bool(True).int(0, 3, size_index)
    if write:
        f.u(64, value)


def pci_init(f, features=0xffffffff):
    f.int(0, 9, 8).u(32, features).int(0, 3, 1).int(0, 3, 2)


def virtio_pci():
    f = Fdp().int(0, 4096, 0x1210).bytes(bytes(pci_ram()))
    pci_init(f)
    pci_bar(f, True, 3, 0, 1, 0)       # notify queue 0 (2 bytes)
    pci_bar(f, False, 1, 0, 0)         # read the ISR
    f.int(0, 9, 6).int(0, 2, 1)        # config change
    yield "init_notify", f.data()
    f = Fdp().int(0, 4096, 0)
    for reg in range(0, 0x80, 4):      # walk the config space of 00:01.0
        f.int(0, 9, 9).int(0, 31, 1).u(8, reg).bool(True).int(0, 3, 2)
    yield "config_walk", f.data()
    f = Fdp().int(0, 4096, 0)
    # BAR sizing through the ports: write all-ones to BAR 4 and 5, read back.
    for reg in (0x20, 0x24):
        f.int(0, 9, 3).u(8, reg).u(32, 0xffffffff).bool(True).int(0, 3, 2)
        f.int(0, 9, 9).int(0, 31, 1).u(8, reg).bool(True).int(0, 3, 2)
    yield "bar_sizing", f.data()
    f = Fdp().int(0, 4096, 0)
    for off in range(0, 0x3c, 2):      # every common-config field, 2 bytes
        pci_bar(f, False, 0, off, 1)
    pci_bar(f, True, 0, 0x14, 0, 3)    # status ACKNOWLEDGE | DRIVER
    pci_bar(f, True, 0, 0x14, 0, 0)    # reset
    yield "common_cfg", f.data()


# --- balloon: the script ops of balloon_fuzz.cpp.
def bl_head(stats=True, oom=True, reporting=True, features=(1 << 1) | (1 << 2) | (1 << 5)):
    return Fdp().bool(stats).bool(oom).bool(reporting).u(64, features)


def bl_pfns(f, q, pfns, kick=True):
    f.int(0, 4, q).int(0, 9, 0).int(1, 3, 1)
    f.int(0, 64, len(pfns)).int(0, 2, 0)
    for p in pfns:
        f.bool(True).int(0, 4104, p)
    f.bool(False)
    if kick:
        f.int(0, 4, q).int(0, 9, 4)


def balloon():
    pfns = list(range(1024, 1024 + 64))   # region 2 (4 MiB), 64 pages
    f = bl_head()
    bl_pfns(f, 0, pfns)
    bl_pfns(f, 1, pfns)
    f.int(0, 4, 0).int(0, 9, 6)
    yield "inflate_deflate", f.data()
    f = bl_head()
    for k in range(8):                      # a whole 2 MiB region in 512 pages
        bl_pfns(f, 0, list(range(512 + 64 * k, 512 + 64 * (k + 1))))
    yield "inflate_region", f.data()
    f = bl_head()
    f.int(0, 4, 2).int(0, 9, 0).int(1, 3, 1).int(0, 64, 3).int(0, 2, 1)
    for tag, val in ((4, 100 << 20), (5, 256 << 20), (6, 120 << 20)):
        f.int(0, 12, tag).u(64, val)
    f.bool(False)
    f.int(0, 4, 2).int(0, 9, 4)
    f.int(0, 4, 0).int(0, 9, 7).int(0, 3, 1)   # request stats
    f.int(0, 4, 0).int(0, 9, 7).int(0, 3, 2)   # read them
    yield "stats", f.data()
    f = bl_head()
    f.int(0, 4, 3).int(0, 9, 2).bool(True).int(0, 4096, 2048).u(32, 2 << 20)
    f.int(0, 4, 3).int(0, 9, 4)
    yield "report", f.data()
    f = bl_head()
    f.int(0, 4, 0).int(0, 9, 7).int(0, 3, 0).u(32, 4096)   # target
    f.int(0, 4, 0).int(0, 9, 8).int(0, 15, 0).int(1, 16, 8).bool(True)
    f.int(0, 4, 0).int(0, 9, 9)                               # reset
    bl_pfns(f, 0, [3000, 3001])
    yield "config_reset", f.data()


# --- api: raw requests, one per route and method.
def api():
    def req(method, target, body=b"", extra=b""):
        head = b"%s %s HTTP/1.1\r\nHost: localhost\r\n" % (method, target) + extra
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        return head + b"\r\n" + body
    yield "ping", req(b"GET", b"/api/v1/vmm.ping")
    yield "info_counters", req(b"GET", b"/api/v1/vm.info") + req(b"GET", b"/api/v1/vm.counters")
    yield "resize_ram", req(b"PUT", b"/api/v1/vm.resize", b'{"desired_ram": 134217728}')
    yield "resize_balloon", req(b"PUT", b"/api/v1/vm.resize", b'{"desired_balloon": 1048576}')
    yield "pause_resume", req(b"PUT", b"/api/v1/vm.pause") + req(b"PUT", b"/api/v1/vm.resume")
    yield "shutdown_close", req(b"PUT", b"/api/v1/vm.shutdown", extra=b"Connection: close\r\n")
    yield "chunked", (b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"a\r\n{\"desired_\r\nd\r\nballoon\": 4096}\r\n0\r\n\r\n")


# --- loader: a minimal PVH ELF and a minimal bzImage.
def loader():
    code = b"\xf4" * 16                          # hlt
    note_name = b"Xen\0"
    note = struct.pack("<III", len(note_name), 4, 18) + note_name + struct.pack("<I", 0x100000)
    ehsize, phsize = 64, 56
    code_off = ehsize + 2 * phsize
    note_off = code_off + len(code)
    eh = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
          + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, ehsize, 0, 0, ehsize, phsize, 2, 64, 0, 0))
    ph_load = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x100000, 0x100000, len(code), 0x1000, 0x1000)
    ph_note = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    elf = eh + ph_load + ph_note + code + note
    yield "pvh_elf", elf
    # The same with a command line and an initrd in the trailer loader_fuzz.cpp reads.
    cmd, initrd = b"console=ttyS0 test=all", b"INITRD" * 8
    yield "pvh_elf_initrd", elf + initrd + cmd + struct.pack("<HH", len(initrd), len(cmd)) + b"\xa5"
    setup = bytearray(512 * 2)                   # setup_sects = 1
    setup[0x1f1] = 1
    struct.pack_into("<H", setup, 0x1fe, 0xaa55)
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020f)
    kernel = b"\xf4" * 512
    struct.pack_into("<I", setup, 0x1f4, len(kernel) // 16)   # syssize
    setup[0x211] = 1                              # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22c, 0x37ffffff)          # initrd_addr_max
    struct.pack_into("<H", setup, 0x236, 1)                   # XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x238, 2048)                # cmdline_size
    struct.pack_into("<Q", setup, 0x258, 0x100000)            # pref_address
    struct.pack_into("<I", setup, 0x260, 0x100000)            # init_size
    yield "bzimage", bytes(setup) + kernel


# --- blk: the script ops of blk_fuzz.cpp (64 KiB image: 128 sectors).
BLK_T = {"in": 0, "out": 1, "flush": 2, "get_id": 3, "discard": 4, "write_zeroes": 5}   # kTypes index


def blk_head(readonly=False, discard=True, queues=1, features=(1 << 64) - 1):
    return Fdp().bool(readonly).bool(discard).int(1, 4, queues).u(64, features)


def blk_step(f, queues, q, op):
    if queues > 1:
        f.int(0, queues - 1, q)
    f.int(0, 9, op)


def blk_req(f, queues, q, kind, sector, data=(), segs=(), status=True, indirect=False):
    """data: (length, writable) buffers; a length that is a multiple of 512
    up to 4 KiB is sent as such, any other as a raw length."""
    blk_step(f, queues, q, 0)
    f.bool(True).int(0, 5, BLK_T[kind]).bool(True).bool(True).int(0, 136, sector)
    if kind in ("discard", "write_zeroes"):
        f.int(0, 3, len(segs))
        for seg_sector, num, flags in segs:
            f.bool(True).int(0, 136, seg_sector).bool(True).int(0, 136, num)
            f.bool(flags == 0)
            if flags:
                f.u(32, flags)
    f.int(0, 7, 1)          # the header is not cut short
    f.int(0, 15, 1)         # and readable
    f.int(0, 3, len(data))
    for length, writable in data:
        if length % 512 == 0 and length <= 4096:
            f.bool(True).int(0, 8, length // 512)
        else:
            f.bool(False).int(0, 4096, length)
        f.bool(writable)
    f.int(0, 7, 1 if status else 0)
    f.bool(indirect)


def blk_kick(f, queues=1, q=0):
    blk_step(f, queues, q, 3)


def blk():
    f = blk_head()
    blk_req(f, 1, 0, "out", 0, [(4096, False)])
    blk_kick(f)
    blk_req(f, 1, 0, "in", 0, [(4096, True)], indirect=True)
    blk_kick(f)
    blk_step(f, 1, 0, 6)
    yield "write_read", f.data()
    f = blk_head()
    blk_req(f, 1, 0, "out", 4, [(512, False), (1024, False)])
    blk_req(f, 1, 0, "flush", 0)
    blk_req(f, 1, 0, "get_id", 0, [(20, True)])
    blk_kick(f)
    blk_step(f, 1, 0, 7)
    f.u(8, 0).int(0, 71, 32).int(1, 16, 1).bool(False)   # writeback = 0
    blk_req(f, 1, 0, "out", 8, [(512, False)])
    blk_kick(f)
    yield "flush_get_id_wce", f.data()
    f = blk_head()
    blk_req(f, 1, 0, "discard", 0, segs=[(8, 8, 0), (32, 16, 0)])
    blk_req(f, 1, 0, "write_zeroes", 0, segs=[(64, 8, 1)])
    blk_kick(f)
    yield "discard_write_zeroes", f.data()
    f = blk_head(readonly=True, discard=False)
    blk_req(f, 1, 0, "out", 0, [(512, False)])
    blk_req(f, 1, 0, "in", 126, [(2048, True)])   # past the end: IOERR
    blk_kick(f)
    yield "readonly_beyond_end", f.data()
    f = blk_head(queues=4)
    for q in range(4):
        blk_req(f, 4, q, "out", 16 * q, [(1024, False)])
        blk_req(f, 4, q, "in", 16 * q, [(1024, True)])
        blk_kick(f, 4, q)
    blk_step(f, 4, 1, 9)   # reset
    blk_req(f, 4, 1, "in", 0, [(512, True)])
    blk_kick(f, 4, 1)
    yield "multiqueue_reset", f.data()


# --- mem: the script ops of mem_fuzz.cpp (128 blocks of 2 MiB at 4 GiB).
MEM_PLUG, MEM_UNPLUG, MEM_UNPLUG_ALL, MEM_STATE = 0, 1, 2, 3


def mem_head(thp=False, features=(1 << 64) - 1):
    return Fdp().bool(thp).u(64, features)


def mem_req(f, kind, block=0, nb=0, indirect=False):
    f.int(0, 9, 0).bool(True).bool(True).int(0, 3, kind)
    f.int(0, 3, 0).int(0, 130, block)       # an address on a block of the region
    f.bool(True).int(0, 130, nb)
    f.int(0, 7, 1).int(0, 15, 1)            # 24 readable bytes
    f.int(0, 7, 2).bool(indirect)           # a 10-byte writable response


def mem_kick(f):
    f.int(0, 9, 3)


def mem_requested(f, blocks):
    f.int(0, 9, 7).int(0, 2, 0).bool(True).int(0, 129, blocks)


def mem():
    f = mem_head()
    mem_requested(f, 8)
    mem_req(f, MEM_PLUG, 0, 4)
    mem_kick(f)
    mem_req(f, MEM_STATE, 0, 8, indirect=True)
    mem_req(f, MEM_UNPLUG, 0, 2)
    mem_kick(f)
    f.int(0, 9, 5)
    mem_req(f, MEM_UNPLUG_ALL)
    mem_kick(f)
    yield "plug_state_unplug", f.data()
    f = mem_head(thp=True)
    mem_requested(f, 16)
    mem_req(f, MEM_PLUG, 8, 8)
    mem_kick(f)
    f.int(0, 9, 6).int(0, 127, 9).int(0, (2 << 20) - 64, 4096)   # the guest writes into block 9
    f.int(0, 9, 9)                                                # reset: the blocks stay
    mem_req(f, MEM_STATE, 8, 8)
    mem_kick(f)
    yield "plug_write_reset", f.data()
    f = mem_head()
    mem_requested(f, 4)
    mem_req(f, MEM_PLUG, 126, 4)    # past the region: ERROR
    mem_req(f, MEM_PLUG, 0, 0)      # no blocks: ERROR
    mem_req(f, MEM_PLUG, 0, 8)      # above requested_size: NACK
    mem_req(f, MEM_UNPLUG, 3, 1)    # not plugged: ERROR
    mem_kick(f)
    yield "refused", f.data()


# --- rng: the script ops of rng_fuzz.cpp.
def rng_head(file=False, limit=None, features=(1 << 64) - 1):
    f = Fdp().bool(file).bool(limit is None)
    if limit is not None:
        f.int(1, 1 << 20, limit[0]).int(1, 1 << 16, limit[1])
    return f.u(64, features)


def rng_req(f, bufs, indirect=False):   # bufs: (length, device-writable)
    f.int(0, 8, 0).int(1, 4, len(bufs))
    for length, writable in bufs:
        f.int(0, 8192, length).int(0, 9, 1 if writable else 0)
    f.bool(indirect)


def rng():
    f = rng_head()
    rng_req(f, [(512, True), (1024, True)])
    f.int(0, 8, 3).int(0, 8, 5)                 # kick, take the used elements
    rng_req(f, [(64, True)], indirect=True)
    f.int(0, 8, 3).int(0, 8, 5)
    yield "urandom_chains", f.data()
    f = rng_head(file=True, limit=(1000, 100))
    rng_req(f, [(4096, True)])
    f.int(0, 8, 3).int(0, 8, 5)
    f.int(0, 8, 8)                              # reset, set up again
    rng_req(f, [(200, True)])
    f.int(0, 8, 3).int(0, 8, 5)
    yield "file_limited_reset", f.data()
    f = rng_head()
    rng_req(f, [(16, False), (16, True)])       # 5.4.6.2: a readable buffer: NEEDS_RESET
    f.int(0, 8, 3).int(0, 8, 8)
    rng_req(f, [(16, True)])
    f.int(0, 8, 6).int(0, 8, 3).int(0, 8, 6)    # bus mastering off, a kick, on again
    f.int(0, 8, 3).int(0, 8, 5)
    yield "readable_then_reset", f.data()


def main():
    for name, gen in (("virtqueue", virtqueue), ("virtio_pci", virtio_pci), ("balloon", balloon),
                      ("api", api), ("loader", loader), ("blk", blk), ("mem", mem), ("rng", rng)):
        d = os.path.join(ROOT, name)
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        for seed, data in gen():
            with open(os.path.join(d, seed), "wb") as fh:
                fh.write(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
