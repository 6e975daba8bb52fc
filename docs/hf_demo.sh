#!/usr/bin/env bash
# The README's diagnostics plot (docs/hf_diagnostics.png): a tiny random Llama made locally by
# transformers, imported, finetuned as vanilla (100 steps of a 300-step schedule), converted with
# --zero-init (double heads, no subln), finetuned 150 steps with a 50-step lambda warmup and
# diagnostics every 10 steps. PyTorch backend on the CPU, float32. Run from the repository root;
# writes under ${1:-runs/hf_demo}. Device, commit and losses of the committed plot: docs/hf.md.
set -euo pipefail
out=${1:-runs/hf_demo}
mkdir -p "$out"
python - "$out" <<'PY'
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               rms_norm_eps=1e-5, tie_word_embeddings=True)
transformers.LlamaForCausalLM(cfg).save_pretrained(f"{sys.argv[1]}/tiny-llama", safe_serialization=True)
PY
diffattn import "$out/tiny-llama" --out "$out/llama"
diffattn train --backend cuda --device cpu --resume-from "$out/llama" --steps 300 --stop-after 100 \
    --eval-every 100 --out "$out/llama-ft" --no-progress
diffattn convert "$out/llama-ft" --to diff --zero-init --out "$out/llama-diff"
diffattn train --backend cuda --device cpu --kernels composed --resume-from "$out/llama-diff" --steps 150 \
    --batch-size 8 --lambda-warmup 50 --diag-every 10 --eval-every 50 --out "$out/llama-diff-ft" --no-progress
diffattn report --runs "$out/llama-diff-ft" --plots "$out/plots"   # diag_llama-diff-ft_llama-diff-ft.png
