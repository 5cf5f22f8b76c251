#!/usr/bin/env bash
# Set up, then the whole workflow on a CPU in a few minutes: prepare tiny Shakespeare (characters),
# train shakespeare_char_cpu through the deepspeed launcher, sample from it.
#   bash launch/quickstart.sh [path/to/tinyshakespeare.txt]     (without a path: the repo's data/tinyshakespeare.txt)
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
input=()
if [ $# -ge 1 ]; then input=("--input=$1"); fi
python data/shakespeare_char/prepare.py "${input[@]}"
deepspeed launch/train.py --recipe shakespeare_char_cpu --overwrite=True
python launch/sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3 --max_new_tokens=200
echo "done: TensorBoard with  tensorboard --logdir out-shakespeare-char-cpu"
