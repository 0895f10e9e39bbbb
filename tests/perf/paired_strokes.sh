#!/bin/bash
# What the strokes test costs a server, paired (docs/benchmarks.md): the shipped model and the same file
# without its strokes thresholds (the batcher then skips the test), served at once on two ports and
# driven in turn by `digits loadtest --protocol v2`, 3 alternating rounds per load point.
#   tests/perf/paired_strokes.sh            (from the repository root, after make test's install)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p runs
.venv/bin/python -c "from pathlib import Path; from tests.api.test_strokes_rejection import model_without_strokes; \
model_without_strokes(Path('runs/lenet5-nostrokes.onnx'))"
.venv/bin/digits serve --model models/lenet5.onnx --port 47001 --metrics-port 0 --threads 1 --log-level warning & A=$!
.venv/bin/digits serve --model runs/lenet5-nostrokes.onnx --port 47002 --metrics-port 0 --threads 1 --log-level warning & B=$!
trap 'kill $A $B 2>/dev/null; wait' EXIT
for port in 47001 47002; do
  for _ in $(seq 120); do .venv/bin/digits health --server 127.0.0.1:$port >/dev/null 2>&1 && break; sleep 0.5; done
done
for point in "4 64" "16 1"; do
  set -- $point
  for round in 1 2 3; do
    for port in 47001 47002; do
      figures=$(.venv/bin/digits loadtest --server 127.0.0.1:$port --protocol v2 --concurrency $1 --batch $2 \
        --duration 4 --warmup 1 --images tests/fixtures/mnist-small --json --quiet 2>/dev/null \
        | .venv/bin/python -c "import json, sys; d = json.load(sys.stdin); print(round(d['images_per_s']))")
      echo "c$1 x$2 round $round $([ $port = 47001 ] && echo 'with the test   ' || echo 'without the test'): $figures images/s"
    done
  done
done
