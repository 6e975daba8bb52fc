"""What Inductor generates for one compiled stage1 training step (needs a CUDA GPU).

    PYTHONPATH=. python benchmarks/scripts/compiled_step_code.py [--attention diff] [--out DIR]

Counts, in the generated code of every graph the step compiles: launches of the four paired
kernels (Inductor launching them itself), calls back into an opaque diffattn op (the Python
launcher per call), clones and copies (a kernel argument taken for written is copied before the
launch), and the debug flag the kernels compile with (assert_indirect_indexing turns on Triton's
int32 overflow asserts). With --out the code itself is written to DIR/compiled_step_code.txt.
"""
import argparse
import os
import re

from torch._inductor.utils import run_and_get_code

from benchmarks.scripts.train_step_table import step_case

WORDS = ("paired_attention_fwd", "paired_attention_bwd_delta", "paired_attention_bwd_dkdv", "paired_attention_bwd_dq",
         "torch.ops.diffattn", "clone", "copy_")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention", default="diff")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    _, model, (batch,), _ = step_case("stage1", a.attention, 2048, 16384, n_batches=1)
    _, code = run_and_get_code(lambda: float(model.train_step(batch, 1e-3)))
    text = "\n\n######\n\n".join(code)
    print(f"stage1 {a.attention}, one compiled training step: {len(code)} generated graphs")
    print("assert_indirect_indexing (the kernels' debug flag):",
          sorted(set(re.findall(r"'assert_indirect_indexing': (\w+)", text))))
    for word in WORDS:
        print(f"{word}: {text.count(word)}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "compiled_step_code.txt"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
