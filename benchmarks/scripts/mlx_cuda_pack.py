"""MLX's CUDA build for one GPU architecture, small enough to travel with one device call.

    python benchmarks/scripts/mlx_cuda_pack.py [--version 0.32.4] [--arch 90] [--out .device/mlx-cuda.tar.xz]

The mlx-cuda-13 wheel is ~90 MB because libmlx.so carries its CUDA kernels for six
architectures (sm_75 ... sm_121a) and PTX, each fatbin entry compressed. An H100 / H200 loads
only the sm_90a entries, so this script fills every other entry with a copy of the smallest
sm_90a entry (headers and architecture tags kept, so the fatbin stays well formed and the driver
still picks the sm_90a code, byte-identical to the wheel's) and packs the mlx and mlx-cuda-13
wheels' files as one tar.xz: ~21 MB instead of two calls carrying halves of the wheel.

On the GPU machine, from the repository root (the CUDA libraries come from torch's nvidia/ tree,
where libmlx.so's rpath, $ORIGIN/../../nvidia/..., looks for them):

    mkdir -p /tmp/mlx && tar -xJf .device/mlx-cuda.tar.xz -C /tmp/mlx \\
      && ln -sfn "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')" /tmp/mlx/nvidia \\
      && export PYTHONPATH=/tmp/mlx:$PYTHONPATH CUDA_HOME=/usr/local/cuda
"""
import argparse
import io
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50  # a fatbin container's header; its entries follow it
ELF_KIND = 2               # entry kinds: 1 PTX, 2 ELF (SASS)


def section(lib: bytearray, name: bytes) -> tuple[int, int]:
    """(file offset, size) of an ELF64 section by name."""
    shoff, = struct.unpack_from("<Q", lib, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", lib, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQ", lib, shoff + i * shentsize)  # name, type, flags, addr, offset, size
    strtab = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        end = lib.index(b"\0", strtab + h[0])
        if lib[strtab + h[0]:end] == name:
            return h[4], h[5]
    raise SystemExit(f"no {name.decode()} section: not a CUDA library")


def entries(lib: bytearray):
    """(header offset, kind, arch, payload offset, payload bytes) of every entry of every fatbin
    container in the .nv_fatbin section. An entry's header holds, at byte 16, its compressed size
    and, at byte 56, its uncompressed size; its payload is padded to the size at byte 8."""
    start, size = section(lib, b".nv_fatbin")
    pos, end = start, start + size
    while pos < end - 16:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", lib, pos)
        if magic != FATBIN_MAGIC:  # containers are 8-byte aligned, padding between them
            pos += 8
            continue
        entry, container_end = pos + header_size, pos + header_size + fat_size
        while entry < container_end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", lib, entry)
            arch, = struct.unpack_from("<I", lib, entry + 28)
            yield entry, kind, arch, entry + entry_header, payload
            entry += entry_header + payload
        pos = container_end


def keep_one_arch(lib: bytearray, arch: int) -> tuple[int, int]:
    """Replace the payload of every entry but arch's SASS with the smallest arch entry's (its compressed
    payload and sizes copied, the rest zeros; entries smaller than it stay as they are): the container
    stays well formed, every entry still decompresses (cuobjdump reads them all), and what no
    sm_<arch> GPU loads compresses to nothing. Returns (bytes kept, bytes replaced)."""
    found = list(entries(lib))
    kept = [e for e in found if e[1] == ELF_KIND and e[2] == arch]
    if not kept:
        raise SystemExit(f"libmlx.so holds no sm_{arch} code")
    donor = min(kept, key=lambda e: struct.unpack_from("<Q", lib, e[0] + 16)[0])
    compressed, = struct.unpack_from("<Q", lib, donor[0] + 16)
    blob, sizes = bytes(lib[donor[3]:donor[3] + compressed]), (bytes(lib[donor[0] + 16:donor[0] + 24]),
                                                               bytes(lib[donor[0] + 56:donor[0] + 64]))
    replaced = 0
    for head, kind, entry_arch, body, payload in found:
        if (kind, entry_arch) == (ELF_KIND, arch):
            continue
        if payload < compressed:  # smaller than the donor: a few hundred bytes, kept as they are
            continue
        lib[body:body + payload] = blob + bytes(payload - compressed)
        lib[head + 16:head + 24], lib[head + 56:head + 64] = sizes
        replaced += payload
    return sum(e[4] for e in kept), replaced


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="0.32.4")
    ap.add_argument("--arch", type=int, default=90, help="the SASS to keep: 90 for H100 / H200")
    ap.add_argument("--out", default=".device/mlx-cuda.tar.xz")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        "--platform", "manylinux_2_35_x86_64", "--platform", "manylinux_2_28_x86_64",
                        "-d", tmp, f"mlx=={args.version}", f"mlx-cuda-13=={args.version}"], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))  # mlx-..., then mlx_cuda_13-...
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=6) as tar:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    for info in z.infolist():
                        if info.is_dir():
                            continue
                        data = z.read(info)
                        if info.filename == "mlx/lib/libmlx.so":
                            lib = bytearray(data)
                            kept, replaced = keep_one_arch(lib, args.arch)
                            data = bytes(lib)
                            print(f"libmlx.so: kept {kept / 2**20:.1f} MiB of sm_{args.arch} code, "
                                  f"replaced {replaced / 2**20:.1f} MiB of other architectures'")
                        member = tarfile.TarInfo(info.filename)
                        member.size, member.mode = len(data), (info.external_attr >> 16) or 0o644
                        tar.addfile(member, io.BytesIO(data))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); install on the GPU machine as this script's docstring says")
    return 0


if __name__ == "__main__":
    sys.exit(main())
