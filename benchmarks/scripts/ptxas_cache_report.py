"""What ptxas says about the kernels Triton compiled in this process's cache: registers, spills, and
whether it serialized the warpgroup MMAs (advisory C7515: every wgmma waits for the previous one).

    TRITON_CACHE_DIR=/tmp/tc python ... (run kernels) ...
    TRITON_CACHE_DIR=/tmp/tc python benchmarks/scripts/ptxas_cache_report.py [--match paired_attention]

Reads each cached PTX with its metadata (warps, stages, shared memory) and recompiles it with the
ptxas bundled with Triton, -v, for the architecture the PTX targets. The kernels' constexprs are not
in the cache, so rows are told apart by warps, stages, shared bytes and spills.
"""
import argparse
import glob
import json
import os
import re

from benchmarks.scripts.kernels_resources import ptxas_advice, wgmma_verdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache")))
    ap.add_argument("--match", default="paired_attention")
    a = ap.parse_args()
    print("| kernel | warps | stages | shared B | regs | spill stores B | wgmma |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for ptx in glob.glob(os.path.join(a.cache, "*", "*.ptx")):
        name = os.path.basename(ptx)[:-4]
        if a.match not in name:
            continue
        with open(ptx[:-4] + ".json") as f:
            meta = json.load(f)
        err = ptxas_advice(ptx, re.search(r"\.target sm_(\w+)", open(ptx).read()).group(1))
        regs = re.search(r"Used (\d+) registers", err).group(1)
        spill = re.search(r"(\d+) bytes spill stores", err).group(1)
        rows.append((name, meta["num_warps"], meta["num_stages"], meta["shared"], int(regs), int(spill),
                     wgmma_verdict(err)))
    for r in sorted(rows):
        print("| " + " | ".join(map(str, r)) + " |")


if __name__ == "__main__":
    main()
