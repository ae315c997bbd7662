#!/usr/bin/env bash
# Issue 17's device check, one command for a session that is lent a GPU (the `device` tool's `run`):
#
#     bash bench/gpu_check.sh            # results under $OUT (or ./gpu-check), about 5 minutes
#
# 1. the GPU and torch's view of it;
# 2. the tests marked `gpu` (a DP step with every tensor on the GPU, fast path on and off; QLoRA
#    4-bit and 8-bit DP rounds through SiteRuntime when bitsandbytes is installed);
# 3. a federated DP-LoRA simulation on CUDA through `fedllm simulate`: the demo's three sites with
#    device = "cuda" in their site file, one round, on a tiny random Llama (the default model's
#    GGUF package may be absent there), all sites sharing the one GPU.
#
# Not in it yet (issue 17 item 2): tokens/s and peak memory of the DP step against the non-DP step
# and the plain recipe on 1B and 8B Llama shapes; that benchmark is still to be written.
# Assumes a Python with torch (CUDA) and fedllm's dependencies (the machine has no network).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"

status=0
$PY -m pytest -q -p no:cacheprovider -m gpu -rs tests/unit 2>&1 | tee "$OUT/gpu-tests.txt" || status=1

scenario=$(mktemp -d)/demo-cuda
cp -r simulations/demo "$scenario"
$PY - "$scenario/sites.toml" <<'PYEOF'
import sys
path = sys.argv[1]
text = open(path).read().replace('[[site]]\n', '[[site]]\ndevice = "cuda"\n')
open(path, "w").write(text)
PYEOF
$PY -m fedllm.cli.main simulate "$scenario" --rounds 1 --output "$OUT/simulate-cuda" \
    --set model.name=tiny-random-llama 2>&1 | tee "$OUT/simulate-cuda.txt" || status=1
exit $status
