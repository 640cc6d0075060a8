#!/bin/sh
# The sweeps behind docs/benchmarks.md, as run on the 2-core CI-class machine (as root, from
# the repository, docker engine up, image tpi:latest built by scripts/build-image.sh).
# Systems alternate round by round, so every ratio compares runs made minutes apart under
# the same load. Each results JSON records its own command, machine and load average.
#
#   sh bench/sweeps.sh llama2-7b ROUNDS   # the Llama-2-7B shape, 8 layers (bench/memory.py make-model)
#   sh bench/sweeps.sh smollm2 ROUNDS     # SmolLM2-135M, local processes
#   tpi bench report                      # docs/benchmarks.md from bench/results/*.json
set -eu
TPI=${TPI:-tpi}
what=$1
rounds=${2:-2}
L7=${L7:-/var/tmp/tpi-bench/llama2-7b-8l}

llama2_7b_round() {
    # 4 containers of 1 GiB (the master 1.5 GiB: it also holds the 0.5 GiB head), compute in bfloat16.
    common="--runner docker --model $L7 --devices 4 --compute-dtype bfloat16 --max-seq 256 --tokens 16 --timeout 1200"
    $TPI bench testbed $common --mem-limit 1g --master-mem-limit 1536m --budget none --latencies 0,5 --allreduce star,ring
    $TPI bench testbed $common --mem-limit 1g --master-mem-limit 1536m --budget 138MiB --latencies 0  # window 2, nothing retained
    $TPI bench testbed $common --scheduler off --latencies 0     # every block resident: does not fit 1 GiB, no limit
    $TPI bench baselines --model $L7 --dtype bfloat16 --systems offload,whole --max-memory 1GiB --limit 1GiB \
        --tokens 16 --rounds 1 --offload-dir /var/tmp
}

smollm2_round() {
    # Local processes (no per-device limit), 8 new tokens; Accelerate at the 150 MB budget in a 1 GiB cgroup.
    common="--runner local --tokens 8"
    $TPI bench testbed $common --devices 1,2,4,8                               # memory vs devices
    $TPI bench testbed $common --devices 4 --latencies 1,5,20 --allreduce star,ring
    $TPI bench testbed $common --devices 4 --bandwidths 100mbit,1gbit --latencies 1
    $TPI bench testbed $common --devices 2 --budget 60MB,150MB --window 2,4    # latency vs budget
    # 60MB does not hold the float32 KV cache of the default 2048-token context: the same with 256
    $TPI bench testbed $common --devices 2 --budget 60MB,100MB --window 2,4 --max-seq 256
    $TPI bench testbed $common --devices 2 --scheduler off
    $TPI bench testbed $common --devices 2 --dtype int8
    $TPI bench testbed $common --devices 2 --dtype gguf,bfloat16               # SmolLM2's own Q4_1 kept 4-bit
    $TPI bench baselines --dtype bfloat16,float32 --systems whole,offload --max-memory 150MB --limit 1GiB \
        --tokens 8 --rounds 3
}

i=1
while [ "$i" -le "$rounds" ]; do
    echo "=== $what round $i/$rounds ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
    case $what in
        llama2-7b) llama2_7b_round ;;
        smollm2) smollm2_round ;;
        *) echo "unknown sweep $what" >&2; exit 2 ;;
    esac
    i=$((i + 1))
done
