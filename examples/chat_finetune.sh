#!/usr/bin/env bash
# Fine-tune on chat data, from a JSONL of conversations to a LoRA-tuned tiny model, on CPU:
# generate conversations, train a tokenizer with the default chat template, convert (rendered
# with the template: token ids + the assistant tokens to train), then train LoRA adapters on 2
# processes under torchrun with an eval set, and merge them into a plain Hugging Face model.
# Everything lands in chat-output/ (OUT=... to change it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-chat-output}
STEPS=${STEPS:-60}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 0. generate 2,000 + 200 synthetic conversations (OpenAI messages JSONL)"
python tools/make_chat_corpus.py "$OUT/data" --train 2000 --eval 200

echo "== 1. train a tokenizer (with the default ChatML-like chat template)"
shardloader train-tokenizer "$OUT/data/train.jsonl" --output "$OUT/tok" --vocab-size 1024

echo "== 2. convert: render every conversation with the template; store ids + assistant spans"
shardloader convert "$OUT/data/train.jsonl" --output "$OUT/train" --tokenizer "$OUT/tok"
shardloader convert "$OUT/data/eval.jsonl" --output "$OUT/eval" --tokenizer "$OUT/tok"

echo "== 3. LoRA fine-tune a tiny Llama on 2 processes (only assistant tokens are trained)"
OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m shardloader.train "$OUT/train" \
    --output-dir "$OUT/run" --model tiny --seq-len 256 --batch-size 8 --lr 3e-3 \
    --warmup-steps 5 --max-steps "$STEPS" --log-every 10 --num-workers 1 \
    --lora-rank 16 --lora-alpha 32 --merge-lora \
    --eval-data "$OUT/eval" --eval-every 20
echo "done: adapter in $OUT/run/adapter/, merged model in $OUT/run/model/," \
    "metrics (loss, eval_loss) in $OUT/run/metrics.jsonl"
