#!/usr/bin/env bash
# One GPU call, several stages: `bash benchmarks/gpu_session.sh STAGE [STAGE ...]` on the device machine.
# Logs and JSON/PNG results go to $OUT (what the device tool brings back). Each stage has its own time
# limit so a slow one cannot eat the call. transformers 5.24 travels as a wheel in .whl/ (the image has 5.17), and so
# do the server's packages for the serve stages: fastapi with opentelemetry-api and annotated-doc (fastapi >= 0.16x
# imports them), starlette, pydantic(-core), annotated-types, typing-inspection, typing-extensions, uvicorn,
# websockets, httptools, h11, click, anyio, sniffio, httpx, httpcore, certifi, idna (`pip download --no-deps`).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/session.log"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/session.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT/session.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$OUT/session.log"
}

for s in "$@"; do
  case $s in
    gpu-tests) stage gpu-tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fast_path.py ;;
    gpu-pool-tests) stage gpu-pool-tests 80 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_fast_path.py -k "pooled or share_a_pool" ;;
    lifetime) stage lifetime 150 python3 benchmarks/bench_lifetime.py --arch qwen2_5_vl-3b --seconds 6 --json "$OUT/lifetime.json" ;;
    q3-8b) stage q3-8b 240 python3 benchmarks/bench_stream.py --arch qwen3_vl-8b --streams fast60 --out "$OUT/q3_8b" ;;
    q3-2b) stage q3-2b 180 python3 benchmarks/bench_stream.py --arch qwen3_vl-2b --streams fast60 --out "$OUT/q3_2b" ;;
    q3-exact) stage q3-exact 300 python3 benchmarks/bench_exact.py --arch qwen3_vl-8b --long-tokens 10000 --short-points 2 --long-points 1 --json "$OUT/q3_exact.json" ;;
    tune) stage tune 240 python3 benchmarks/tune_attention.py --json "$OUT/tune.json" ;;
    q25-3b) stage q25-3b 300 python3 benchmarks/bench_stream.py --arch qwen2_5_vl-3b --streams fast60,long10 --out "$OUT/q25_3b" ;;
    q25-3b-prof) stage q25-3b-prof 190 python3 benchmarks/bench_stream.py --arch qwen2_5_vl-3b --streams fast60,long10 --profile --out "$OUT/q25_3b" ;;
    bounded64k) stage bounded64k 120 python3 benchmarks/bench_bounded.py --minutes 10 --budget-tokens 65536 --recall-grids 16 --recall-host-tokens 65536 --compare-recall --out "$OUT/bounded64k" ;;
    streams-prof) stage streams-prof 100 python3 benchmarks/bench_streams.py --streams 16 --seconds 8 --profile "$OUT/streams_prof" --json "$OUT/streams_prof.json" ;;
    exact-3b) stage exact-3b 380 python3 benchmarks/bench_exact.py --arch qwen2_5_vl-3b --long-tokens 30000 --short-points 1 --long-points 1 --skip-bf16 --json "$OUT/exact_3b.json" ;;
    streams-short) stage streams-short 330 python3 benchmarks/bench_streams.py --streams 1,8,32,128 --seconds 10 --json "$OUT/streams_pool.json" ;;
    serve-short) stage serve-short 380 python3 benchmarks/bench_serve.py --sessions 1,8,32 --seconds 15 --max-n 128 --out "$OUT/serve" ;;
    serve-min) stage serve-min 330 python3 benchmarks/bench_serve.py --sessions 1,8,32 --seconds 15 --max-n 64 --out "$OUT/serve" ;;
    q25-fast60-prof) stage q25-fast60-prof 100 python3 benchmarks/bench_stream.py --arch qwen2_5_vl-3b --streams fast60 --profile --out "$OUT/q25_3b" ;;
    streams) stage streams 540 python3 benchmarks/bench_streams.py --streams 1,8,32,64,128 --seconds 20 --json "$OUT/streams_pool.json" ;;
    streams-realtime) stage streams-realtime 300 python3 benchmarks/bench_streams.py --mode realtime --streams 100 --seconds 30 --json "$OUT/streams_realtime.json" ;;
    streams-q3) stage streams-q3 400 python3 benchmarks/bench_streams.py --arch qwen3_vl-8b --streams 1,8,32 --seconds 20 --json "$OUT/streams_q3_8b.json" ;;
    serve) stage serve 560 python3 benchmarks/bench_serve.py --sessions 1,8,32 --seconds 20 --out "$OUT/serve" ;;
    serve-nopool) stage serve-nopool 400 python3 benchmarks/bench_serve.py --sessions 1,8 --no-find-max --seconds 20 --server-arg=--no-pool --out "$OUT/serve_nopool" ;;
    *) echo "unknown stage $s" | tee -a "$OUT/session.log" ;;
  esac
done
tail -c 3000 "$OUT/session.log"
