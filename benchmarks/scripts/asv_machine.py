"""Record this machine in ~/.asv-machine.json under NAME, with the details asv detects.

    python benchmarks/scripts/asv_machine.py NAME

`asv machine --machine NAME --yes` records NAME with every other field blank (asv keeps only the
arguments that differ from its detected defaults, and fills the defaults only when none is given),
and a run then writes that blank machine.json over the committed one. This stores asv's own
defaults (os, arch, cpu, num_cpu, ram) with the name.
"""
import sys

from asv.machine import Machine, MachineCollection


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0]:
        print("usage: python benchmarks/scripts/asv_machine.py NAME", file=sys.stderr)
        return 2
    info = {**Machine.get_defaults(), "machine": argv[0]}
    MachineCollection.save(argv[0], info)
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
