#!/usr/bin/env bash
# The quick start: generate a small corpus, train a tokenizer on it, convert it into text shards
# and into tokenized shards, inspect and verify the result, stream packed batches and resume
# mid-epoch, then train a tiny Llama on 2 processes under torchrun. Everything lands in
# demo-output/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-demo-output}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. generate a small corpus (8 MB of JSONL.zst in 8 files)"
python tools/make_corpus.py "$OUT/corpus" --mb 8 --num-files 8 --format jsonl.zst

echo "== 2. train a byte-level BPE tokenizer on it (offline)"
shardloader train-tokenizer "$OUT/corpus" --output "$OUT/tokenizer" --vocab-size 4096

echo "== 3. convert to Arrow text shards"
shardloader convert "$OUT/corpus" --output "$OUT/text-shards" --shard-bytes 2MB --task-bytes 1MB

echo "== 4. convert to tokenized shards (token ids, EOS after every document)"
shardloader convert "$OUT/corpus" --output "$OUT/token-shards" --tokenizer "$OUT/tokenizer" \
    --shard-bytes 2MB --task-bytes 1MB

echo "== 5. inspect and verify"
shardloader inspect "$OUT/token-shards" --samples 2 --shards 3
shardloader verify "$OUT/text-shards"
shardloader verify "$OUT/token-shards"

echo "== 6. stream packed batches (2 DataLoader workers), stop, save the position, resume exactly"
python examples/stream.py "$OUT/token-shards" --seq-len 512 --batch-size 8 --workers 2
echo "== 7. train a tiny Llama (built from a config) on 2 processes under torchrun (gloo, CPU)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m shardloader.train "$OUT/token-shards" \
    --output-dir "$OUT/run" --model tiny --seq-len 256 --batch-size 8 --lr 2e-3 --warmup-steps 10 \
    --max-steps 60 --log-every 10 --checkpoint-every 30 --num-workers 2
echo "done: see $OUT/ (training metrics in $OUT/run/metrics.jsonl, checkpoints in $OUT/run/checkpoints)"
