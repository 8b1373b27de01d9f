#!/usr/bin/env bash
# Two tiny trainings started together on a fresh private 2-CPU Ray head (by hand, not in CI): does each get its
# data while the other holds the cluster's CPUs? Prints each run's last lines and exit status.
#   bash benchmarks/runs_at_once.sh [STEPS] [TIMEOUT_S]      (defaults 3000 and 300)
set -u
steps=${1:-3000}; limit=${2:-300}
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=token
dir=$(mktemp -d /tmp/rl-at-once-XXXX); port=$((20000 + RANDOM % 20000))
ray get-auth-token --generate >/dev/null 2>&1
ray start --head --node-ip-address=127.0.0.1 --port=$port --num-cpus=2 --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port=$((port + 1)) --disable-usage-stats --temp-dir="$dir" >/dev/null
trap 'ray stop --force >/dev/null 2>&1' EXIT  # ray stop stops every Ray on the machine: run this on a quiet one
export RAY_ADDRESS=127.0.0.1:$port REASONLAB_HOME=$dir/home
tiny="task.a_digits=2 task.b_digits=2 model.n_layer=1 model.d_model=32 model.n_head=2 train.batch_size=16
      eval.num_examples=16 eval.test_examples=16 scaling.torch_threads=1 train.max_steps=$steps
      train.eval_every=$((steps / 2)) train.log_every=$((steps / 6))"
start=$(date +%s)
for run in a b; do
  # shellcheck disable=SC2086
  timeout "$limit" reasonlab train jobs/quickstart.yaml $tiny tracking.run_name=$run > "$dir/$run.log" 2>&1 &
  sleep 3
done
wait
echo "both ended after $(( $(date +%s) - start )) s"
for run in a b; do
  grep -h "step \|no training\|Cluster res\|finished run\|stopped by" "$dir/$run.log" | tail -4 | sed "s/^/$run: /"
done
