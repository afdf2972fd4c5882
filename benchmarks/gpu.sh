#!/usr/bin/env bash
# The GPU measures of the model stack, in one call on a lent machine (device `run`):
#   bash benchmarks/gpu.sh            # logs to $OUT (or ./gpu-logs) and prints the tables
# The device image has torch but not this project's install: run from the repo root.
set -uo pipefail
out="${OUT:-gpu-logs}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
# One log for all configs: the device tool returns at most 8 files.
# DiT training throughput / MFU: S (the class) and B, 256 and 512 px, eager and compiled.
for spec in "S 256 64" "S 256 256" "S 512 64" "B 256 64" "B 512 32"; do
  set -- $spec
  for c in "" "--compile"; do
    "$py" benchmarks/dit.py --only speed --device cuda --size "$1" --resolution "$2" --batch-size "$3" \
      --peak-tflops 989 --warmup-steps 8 --timed-steps 30 $c 2>&1 | tee -a "$out/dit-speed.txt" \
      | grep -E "speed:|swiglu|gelu|measured|Error|error" 
  done
done
# Where a B / 512 px step's GPU time goes (issue 13 item 7: the profile's top items, before a change and after).
for c in "" "--compile"; do
  "$py" benchmarks/dit.py --only speed --device cuda --size B --resolution 512 --batch-size 32 --peak-tflops 989 \
    --warmup-steps 8 --timed-steps 10 --profile 5 --variants swiglu+scale $c 2>&1 | tee -a "$out/dit-profile.txt" \
    | grep -vE "^(USDT|ERROR|WARNING)"
done
