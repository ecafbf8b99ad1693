#!/usr/bin/env bash
# Convert a corpus with a Slurm job array: every array task converts its share of the
# conversion's tasks (task % NUM_TASKS == index) into one shared output, then one job merges the
# manifest. The result is byte-identical to a single-machine run, and a rerun of any array task
# resumes where it stopped. On Slurm (each array task gets all its CPUs as processes):
#
#   export INPUT=/shared/raw OUTPUT=/shared/shards NUM_TASKS=16
#   jid=$(sbatch --parsable --array=0-15 --cpus-per-task=16 examples/slurm_array.sh)
#   sbatch --dependency=afterok:"$jid" --wrap "shardloader merge $OUTPUT"
#
# Without Slurm (no SLURM_ARRAY_TASK_ID) it simulates the array with a loop, then merges:
#
#   INPUT=data/ OUTPUT=shards/ NUM_TASKS=4 bash examples/slurm_array.sh
#
# CONVERT_ARGS adds convert flags (e.g. "--tokenizer tok/ --shard-bytes 256MB").
#SBATCH --job-name=shardloader-convert
#SBATCH --time=04:00:00
set -euo pipefail
: "${INPUT:?set INPUT to the corpus (files, folders or globs; local or fsspec URLs)}"
: "${OUTPUT:?set OUTPUT to the shared output directory or URL}"
NUM_TASKS=${NUM_TASKS:-${SLURM_ARRAY_TASK_COUNT:-4}}
read -r -a EXTRA <<< "${CONVERT_ARGS:-}"

convert_share() {
    shardloader convert "$INPUT" --output "$OUTPUT" \
        --num-tasks "$NUM_TASKS" --task-index "$1" "${EXTRA[@]}"
}

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Array indices may start above 0 (--array=1-16): count from the first.
    convert_share $((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))
else
    for ((index = 0; index < NUM_TASKS; index++)); do
        echo "== array task $index of $NUM_TASKS"
        convert_share "$index"
    done
    shardloader merge "$OUTPUT"
fi
