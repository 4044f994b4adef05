#!/usr/bin/env bash
# The README's main job on a CPU: generate toy clips with sound, pack them into webdataset shards,
# encode them to latent shards with the tiny codecs, train the tiny model with the base recipe,
# export the EMA weights in the released checkpoint layout and sample mp4s with sound from them (from
# the prompt, audio-driven from a clip's sound, and with a clip's sound as the voice reference).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=demo_data
RUN=outputs/cpu_demo
STEPS=${STEPS:-300}

python -m magitrain.data.synthetic "$DATA/clips" --num-clips 16 --seconds 1 2 --size 64x128
python data_tools/make_shards.py "$DATA/clips" "$DATA/shards" --max-count 4 --workers 2
python data_tools/encode_shards.py "$DATA/shards/*.tar" "$DATA/latent" codecs=tiny --bucket 32x64:0.32 --dtype float32
if [ -e "$RUN" ]; then  # a fresh start into an earlier run's checkpoints is refused: keep that run aside
    rm -rf "$RUN.previous" && mv "$RUN" "$RUN.previous" && echo "moved the previous demo run to $RUN.previous"
fi
python train.py experiment=cpu_demo trainer.max_steps="$STEPS" hydra.run.dir="$RUN"
python -m magitrain.export "$RUN/checkpoints/last.ckpt" "$RUN/export" --ema
python infer.py ckpt="$RUN/export" model=tiny codecs=tiny prompt="A white square bounces over a gradient" \
    seconds=0.32 resolution=64x32 steps=8 seed=0 out="$RUN/sample.mp4"
# audio-driven: the pictures generated for the sound of one of the toy clips (the mp4 carries that sound)
python infer.py ckpt="$RUN/export" model=tiny codecs=tiny prompt="A white square bounces over a gradient" \
    audio="$(ls "$DATA"/clips/*.mp4 | head -n 1)" seconds=0.32 resolution=64x32 steps=8 seed=0 out="$RUN/sample_a2v.mp4"
# a voice reference (infer.py voice=): another toy clip's sound at the reference-audio slot (the demo
# network is not trained with references, so this shows the path, not a learned voice)
python infer.py ckpt="$RUN/export" model=tiny codecs=tiny prompt="A white square bounces over a gradient" \
    voice="$(ls "$DATA"/clips/*.mp4 | sed -n 2p)" seconds=0.32 resolution=64x32 steps=8 seed=0 out="$RUN/sample_voice.mp4"
echo "CPU demo done: losses in $RUN/csv/metrics.csv, released-layout weights in $RUN/export, samples in $RUN/sample.mp4, $RUN/sample_a2v.mp4 and $RUN/sample_voice.mp4"
