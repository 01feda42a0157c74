#!/usr/bin/env bash
# One device session: GPU checks of the fused backend, tuning, the layer benchmark; logs in $OUT.
#   source .whl/gpu_env.sh && bash bench/device_run.sh [STEPS...]   (steps: check2 check4 bench4 ...)
# kernels: the router and plan kernels' GPU tests; sweep1: the one-GPU sweep beside triton_kernels
# and torch; variants: tune.py's `auto` launch at 4,096 tokens for each tree under .variants/ (other
# commits, carried: `git archive C flashmoe_py bench tests/one_rank.py tests/grad_reference.py | tar -x -C .variants/C`) and
# this one, one after another on the same GPU, VARIANT_ROUNDS times in turn (a setting's time moves
# ~2% between runs: alternate, compare the rounds); fbvariants: the same for flash/saved fwd+bwd
# (bench/layer.py --fwd-bwd, FB_PRESETS at TOKENS; FB_ARGS=--user-graph adds the step captured whole); backkernels: the backward's token-sum and
# router-gradient kernels alone (bench/backward_kernels.py); profbwd: torch.profiler over flash/saved
# training steps (PROF_ARGS=--shapes: a row per op and input shapes); profvariants: that profile for each
# tree under .variants/ and this one, in turn (a backward kernel change's time inside the step); gemm1: bench/gemm1_loop.py --peer
# (the GEMM1 loop's schedules, the warp-specialised Gluon one, triton_kernels; GEMM1_LIMIT seconds at
# most); wgrad: the weight-gradient kernel's GPU tests, then bench/wgrad_probe.py against torch's
# grouped products (WGRAD_PRESETS at WGRAD_TOKENS, uniform and skewed routing); ncuwgrad: ncu over
# that probe's first NCU_COUNT weight-gradient launches (what bounds it: DRAM, L2, the tensor pipe);
# points: bench/tune.py's SETTINGS (default auto), timed in turn, at each POINTS entry "shape:tokens"
# (a preset, or a random_ shape of bench/layer.py --random 6 --random-seed RANDOM_SEED, default 0), one run a point; sass: the compiled builds; host: the fused backend's host-side guarantees (tests/gpu/check_host_paths.py);
# trainingN: 200 training steps of a tiny model beside its float64 reference on N GPUs (tests/gpu/check_training.py).
# ranks: the fused kernel at worlds 2, 4 and 8 in one process on one GPU (tests/gpu/check_ranks_on_one_gpu.py;
# RANKS_ARGS, e.g. "--worlds 2 --calls 3"); compile: FlashBackend.compile_variants leaves no variant for a first
# forward to compile (tests/gpu/check_compile_variants.py, one GPU, Triton's cache empty).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD:${PYTHONPATH:-} FLASHMOE_COMMIT=${FLASHMOE_COMMIT:-unknown}
if ls .tcache/triton_cache.tgz.part-* > /dev/null 2>&1 && [ ! -e ~/.triton/.unpacked ]; then  # once per machine
  mkdir -p ~/.triton && cat .tcache/triton_cache.tgz.part-* | tar -xz -C ~/.triton && touch ~/.triton/.unpacked
fi
fail=0  # the exit code: 1 once any step failed (or was not known)
note_rc() { [ "$1" -eq 0 ] || fail=1; }
run() {  # name, limit_s, nproc, script args...
  local name=$1 limit=$2 n=$3 rc; shift 3
  echo "=== $name (n=$n, limit ${limit}s) $(date -u +%FT%TZ)"
  timeout -k 10 "$limit" torchrun --nproc-per-node "$n" "$@" > "$OUT/$name.log" 2>&1
  rc=$?; note_rc $rc
  echo "=== $name rc=$rc $(date -u +%FT%TZ)"; tail -n 25 "$OUT/$name.log"
}
for step in "$@"; do
  case $step in
    check*) n=${step#check}; run "check_w$n" 420 "$n" tests/gpu/check_flash.py --calls "${CALLS:-1000}" \
              ${PRESETS:+--presets} --out "$OUT/check_w$n.json" ;;
    nvcheck*) n=${step#nvcheck}; run "nvcheck_w$n" 420 "$n" tests/gpu/check_flash.py --transport nvshmem \
              --calls "${CALLS:-1000}" ${PRESETS:+--presets} --out "$OUT/nvcheck_w$n.json" ;;
    faults*) n=${step#faults}; run "faults_w$n" 120 "$n" tests/gpu/check_faults.py ;;
    inputs*) n=${step#inputs}; run "inputs_w$n" 300 "$n" tests/gpu/check_inputs.py --out "$OUT/inputs_w$n.json" ;;
    killed*) n=${step#killed}; echo "=== killed rank (n=$n)"
              timeout -k 10 240 python3 tests/gpu/check_killed_rank.py --gpus "$n" --out "$OUT/killed_w$n.json" \
              > "$OUT/killed_w$n.log" 2>&1; rc=$?; echo "=== killed rc=$rc"; note_rc $rc; tail -n 40 "$OUT/killed_w$n.log" ;;
    timeouts*) echo "=== timeouts (one GPU, one process)"
              timeout -k 10 240 python3 tests/gpu/check_timeouts.py --out "$OUT/timeouts.json" > "$OUT/timeouts.log" 2>&1
              rc=$?; echo "=== timeouts rc=$rc"; note_rc $rc; tail -n 10 "$OUT/timeouts.log" ;;
    host*) echo "=== host paths (one GPU, one process)"
              timeout -k 10 360 python3 tests/gpu/check_host_paths.py --out "$OUT/host.json" > "$OUT/host.log" 2>&1
              rc=$?; echo "=== host rc=$rc"; note_rc $rc; tail -n 10 "$OUT/host.log" ;;
    soak*) n=${step#soak}; run "soak_w$n" 400 "$n" tests/gpu/check_soak.py ;;
    hf*) n=${step#hf}; run "hf_w$n" 300 "$n" tests/gpu/check_hf.py --out "$OUT/hf_w$n.json" ;;
    mpicheck*) n=${step#mpicheck}; echo "=== mpirun check (n=$n)"
              NGPUS=$n timeout -k 10 420 bash launch/mpirun.sh tests/gpu/check_flash.py --calls "${CALLS:-1000}" \
              --out "$OUT/mpicheck_w$n.json" > "$OUT/mpicheck_w$n.log" 2>&1; rc=$?; echo "=== mpicheck rc=$rc"; note_rc $rc
              tail -n 25 "$OUT/mpicheck_w$n.log" ;;
    tune*) n=${step#tune}; run "tune_w$n" 500 "$n" bench/tune.py ${TUNE_ARGS:-} --out "$OUT/tune_w$n.json" ;;
    bench*) n=${step#bench}; run "bench_w$n" 540 "$n" bench/layer.py --backends ${BACKENDS:-torch flash} \
              ${BENCH_ARGS:-} --out "$OUT/bench_w$n.json" ;;
    kernels) echo "=== kernel tests"; timeout -k 10 300 python3 -m pytest -q tests/test_router_kernel.py \
              tests/test_plan_kernel.py > "$OUT/kernels.log" 2>&1; rc=$?; echo "=== kernels rc=$rc"; note_rc $rc; tail -n 3 "$OUT/kernels.log" ;;
    sweep1) for p in ${SWEEP_PRESETS:-mixtral_8x7b qwen3_30b_a3b deepseek_v3}; do
              run "sweep_w1_$p" "${SWEEP_LIMIT:-300}" 1 bench/layer.py --preset "$p" \
                --backends ${SWEEP_BACKENDS:-flash triton_kernels torch} --tokens ${TOKENS:-128 2048 4096 16384} \
                --iters 20 --input-sets 2 ${BENCH_ARGS:-} --out "$OUT/sweep_w1_$p.json"; done ;;
    random1) run random_w1 "${SWEEP_LIMIT:-300}" 1 bench/layer.py --preset --random "${RANDOM_SHAPES:-6}" \
              --backends ${SWEEP_BACKENDS:-flash triton_kernels torch} --tokens ${TOKENS:-128 2048 4096 16384} \
              --iters 20 --input-sets 2 ${BENCH_ARGS:-} --out "$OUT/random_w1.json" ;;
    ranks*) echo "=== ranks on one GPU (one process: worlds 2, 4, 8)"
              timeout -k 10 420 python3 tests/gpu/check_ranks_on_one_gpu.py ${RANKS_ARGS:-} --out "$OUT/ranks.json" \
              > "$OUT/ranks.log" 2>&1; rc=$?; echo "=== ranks rc=$rc"; note_rc $rc; tail -n 12 "$OUT/ranks.log" ;;
    compile*) echo "=== compile_variants (one GPU, one process)"
              timeout -k 10 240 python3 tests/gpu/check_compile_variants.py --out "$OUT/compile_variants.json" \
              > "$OUT/compile_variants.log" 2>&1; rc=$?; echo "=== compile rc=$rc"; note_rc $rc; tail -n 6 "$OUT/compile_variants.log" ;;
    training*) n=${step#training}; run "training_w$n" 300 "$n" tests/gpu/check_training.py --out "$OUT/training_w$n.json" ;;
    backward*) n=${step#backward}; run "backward_w$n" 480 "$n" tests/gpu/check_backward.py ${PRESETS:+--presets} \
              --out "$OUT/backward_w$n.json" ;;
    cache) tar -cz -C ~/.triton cache | split -b 15m - "$OUT/triton_cache.tgz.part-" || fail=1  # files under 16 MB
           ls -la "$OUT"/triton_cache.tgz.part-* ;;
    variants) shopt -s nullglob; for round in $(seq "${VARIANT_ROUNDS:-2}"); do for root in .variants/*/ .; do
              tag=$([ "$root" = . ] && echo current || basename "$root")
              run "tune_${tag}_$round" 300 1 "$root/bench/tune.py" --preset ${VARIANT_PRESETS:-mixtral_8x7b qwen3_30b_a3b} \
                --tokens ${VARIANT_TOKENS:-4096} --settings ${VARIANT_SETTINGS:-auto} --iters 20 \
                --out "$OUT/tune_${tag}_$round.json"; done; done ;;
    points) [ -n "${POINTS:-}" ] || { echo "=== points: set POINTS=\"shape:tokens ...\" (a preset or a random_ shape)"; fail=1; }
            for point in ${POINTS:-}; do
              shape=${point%%:*}; tok=${point##*:}  # each point its own tune.py run: its settings in turn
              case $shape in random_*) pick="--random 6 --random-seed ${RANDOM_SEED:-0} --only $shape" ;;
                *) pick="--preset $shape" ;; esac
              run "tune_${shape}_$tok" 150 1 bench/tune.py $pick --tokens "$tok" \
                --settings ${SETTINGS:-auto} --rounds 2 --out "$OUT/tune_${shape}_$tok.json"; done ;;
    fbvariants) shopt -s nullglob; for round in $(seq "${VARIANT_ROUNDS:-2}"); do for root in .variants/*/ .; do
              tag=$([ "$root" = . ] && echo current || basename "$root")
              run "fb_${tag}_$round" 300 1 "$root/bench/layer.py" --preset ${FB_PRESETS:-qwen3_30b_a3b deepseek_v3} \
                --tokens ${TOKENS:-4096} --backends flash --fwd-bwd --backwards saved --iters 20 --input-sets 2 \
                ${FB_ARGS:-} --out "$OUT/fb_${tag}_$round.json"; done; done ;;
    profvariants) shopt -s nullglob; for round in $(seq "${VARIANT_ROUNDS:-1}"); do for root in .variants/*/ .; do
              tag=$([ "$root" = . ] && echo current || basename "$root")  # a backward change's kernels inside the step
              for p in ${PROF_PRESETS:-qwen3_30b_a3b deepseek_v3}; do
                run "prof_${tag}_${p}_$round" 240 1 "$root/bench/kernel_profile.py" --preset "$p" --tokens ${TOKENS:-4096} \
                  --fwd-bwd --backward saved --iters 5 ${PROF_ARGS:-} > /dev/null
                echo "$tag $p round $round: $(grep -E '_kernel|cutlass|Self CUDA time total' "$OUT/prof_${tag}_${p}_$round.log" \
                  | awk '{print $1, $(NF-2), $NF}' | head -12 | tr '\n' ';')"; done; done; done ;;
    backkernels) run backward_kernels 240 1 bench/backward_kernels.py ${BACK_ARGS:-} --out "$OUT/backward_kernels.json" ;;
    profbwd) for p in ${PROF_PRESETS:-qwen3_30b_a3b deepseek_v3}; do  # where a training step's time goes
              run "profile_bwd_$p" 240 1 bench/kernel_profile.py --preset "$p" --tokens ${TOKENS:-4096} --fwd-bwd \
                --backward saved --iters 5 ${PROF_ARGS:-}; done ;;
    gemm1) echo "=== gemm1 loop (Triton schedules, ws gluon, triton_kernels)"  # bench/gemm1_loop.py, one GPU
              timeout -k 10 "${GEMM1_LIMIT:-300}" python3 bench/gemm1_loop.py --peer > "$OUT/gemm1_loop.log" 2>&1
              rc=$?; echo "=== gemm1 rc=$rc"; note_rc $rc; tail -n 30 "$OUT/gemm1_loop.log" ;;
    wgrad) echo "=== wgrad"; timeout -k 10 150 python3 -m pytest -q tests/test_expert_wgrad.py > "$OUT/wgrad_tests.log" 2>&1
              rc=$?; echo "=== wgrad tests rc=$rc"; note_rc $rc; tail -n 3 "$OUT/wgrad_tests.log"
              timeout -k 10 "${WGRAD_LIMIT:-300}" python3 bench/wgrad_probe.py --preset ${WGRAD_PRESETS:-qwen3_30b_a3b deepseek_v3} \
                --tokens ${WGRAD_TOKENS:-4096 8192} --skew 0 1 --out "$OUT/wgrad_probe.json" > "$OUT/wgrad_probe.log" 2>&1
              rc=$?; echo "=== wgrad probe rc=$rc"; note_rc $rc; grep -E "grouped  |gluon" "$OUT/wgrad_probe.log" ;;
    ncuwgrad) echo "=== ncu wgrad_kernel"  # what bounds it: DRAM, L2, the tensor pipe (one probe call each)
              timeout -k 10 "${WGRAD_LIMIT:-300}" ncu --clock-control none -k regex:wgrad_kernel -c "${NCU_COUNT:-2}" \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
                python3 bench/wgrad_probe.py --preset ${WGRAD_PRESETS:-deepseek_v3} --tokens ${WGRAD_TOKENS:-4096} \
                --skew 0 --rounds 1 --iters 1 > "$OUT/ncu_wgrad.txt" 2>&1
              rc=$?; echo "=== ncu rc=$rc"; note_rc $rc; grep -E "wgrad_kernel|Duration|Throughput|Hit Rate|Pipe" "$OUT/ncu_wgrad.txt" | head -40 ;;
    sass) echo "=== sass"; bash .whl/sass_stats.sh fused_moe_kernel > "$OUT/sass.txt" 2>&1; rc=$?; note_rc $rc
          cat "$OUT/sass.txt" ;;
    *) echo "=== unknown step $step"; fail=1 ;;
  esac
done
[ "$fail" -eq 0 ] || echo "=== some step failed (rc above)"
exit "$fail"
