#!/usr/bin/env bash
# The default job on a bare machine: set up, prepare the built-in Shakespeare, train the CPU-sized
# character model, sample from it, report its validation perplexity, and draw what it attends to.
# Re-running continues.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
gptjax=.venv/bin/gptjax
out=out/shakespeare_char_cpu
[ -f data/shakespeare_char/meta.json ] || "$gptjax" prepare --input builtin:shakespeare --tokenizer char --out data/shakespeare_char
resume=""
[ -d "$out/checkpoints" ] && resume="--resume"
"$gptjax" train shakespeare_char_cpu $resume
"$gptjax" sample --checkpoint "$out" --prompt "ROMEO:" --num-samples 2 --max-new-tokens 300
"$gptjax" perplexity --checkpoint "$out" --split val
"$gptjax" explain --checkpoint "$out" --prompt "ROMEO:" --layers 0
"$gptjax" attention --checkpoint "$out" --prompt "ROMEO: But soft, what light" --layers 0,3
echo "loss curves: $out/loss.png; attention maps: $out/attention/layer_0.png, layer_3.png;" \
     "TensorBoard: .venv/bin/python -m pip install tensorboard && .venv/bin/tensorboard --logdir $out/tensorboard"
