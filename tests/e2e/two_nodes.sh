#!/usr/bin/env bash
# Two "nodes" on one machine: network namespaces joined by a veth pair, each
# with its own host name (unshare --uts). moe-launch starts a dp2 + ep2 run
# from a hostfile of their addresses, one rank per node, with mpirun inside the
# first namespace reaching the second through a launch agent (ip netns exec, the
# ssh stand-in) and MPI's TCP transport over the subnet; the experts'
# all-to-all crosses the "network". Its losses must equal the same layout's on
# one node, and the trainer must report the ranks on their nodes. Then the same
# two nodes as a Slurm cluster (munged with its own socket, slurmctld and one
# slurmd per namespace, each under its node's host name): sbatch
# launch/slurm/train.sbatch with srun --mpi=pmix, stopped by `scancel -s TERM`
# mid-run and submitted again (the requeue path: checkpoint, exit 0,
# --resume-if-present), and with mpirun inside the allocation (moe-launch
# --slurm); each equals the one-node run. Everything is torn down on exit,
# failed or not. Needs root and network namespaces, and Slurm + munge for the
# second part: skipped (with the reason) where they are not there.
source "$(dirname "$0")/common.sh"
LAUNCH="$BIN_DIR/moe-launch"
[ "$(id -u)" = 0 ] || skip "two-node test needs root (network namespaces)"
tag=$$
A=fmoe_a_$tag; B=fmoe_b_$tag; VA=fmva$tag; VB=fmvb$tag
net=10.213.$(( tag % 200 + 20 ))
dir="$WORK_DIR/two_nodes"; rm -rf "$dir" "$dir".*; mkdir -p "$dir"
cleanup() {
  [ -f "$dir/munged.pid" ] && kill "$(cat "$dir/munged.pid")" 2>/dev/null || true
  ip netns pids "$A" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns pids "$B" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
  ip link del "$VA" 2>/dev/null || true
}
trap cleanup EXIT
ip netns add "$A" 2>/dev/null || skip "cannot create network namespaces here"
ip netns add "$B"
ip link add "$VA" type veth peer name "$VB"
ip link set "$VA" netns "$A"; ip link set "$VB" netns "$B"
ip -n "$A" addr add "$net.1/24" dev "$VA"; ip -n "$B" addr add "$net.2/24" dev "$VB"
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set "$VA" up; ip -n "$B" link set "$VB" up
# Reachability without ping (not installed everywhere): a TCP connect from A to a listener in B.
ip netns exec "$B" python3 -c "import socket; s = socket.socket(); s.bind(('$net.2', 45999)); s.listen(1); s.settimeout(10); s.accept()" &
sleep 0.5
ip netns exec "$A" python3 -c "import socket; socket.create_connection(('$net.2', 45999), timeout=5)" || fail "the two namespaces do not reach each other"
wait

# The launch agent: Open MPI calls it like ssh (host, then the command's words).
cat > "$dir/agent.sh" <<AGENT
#!/bin/sh
host=\$1; shift
case "\$host" in
  $net.1) ns=$A; name=node-a ;;
  $net.2) ns=$B; name=node-b ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$name; \$*"
AGENT
chmod +x "$dir/agent.sh"
printf '%s slots=1\n%s slots=1\n' "$net.1" "$net.2" > "$dir/hosts"
RUN=(--set training.steps=12 --set training.eval_interval=0 --set training.checkpoint_interval=0 --set parallel.ep=2
     --set training.micro_batch_size=4 --set optimizer.warmup_steps=2)
MCA="--mca plm_rsh_agent $dir/agent.sh --mca btl tcp,self --mca btl_tcp_if_include $net.0/24 --mca oob_tcp_if_include $net.0/24"

"$LAUNCH" $(micro_args "$dir/two") "${RUN[@]}" --hostfile "$dir/hosts" --mpirun-args "$MCA" --dry-run > "$dir/plan.log" \
  || { cat "$dir/plan.log"; fail "moe-launch --dry-run failed"; }
grep -q "nodes: 2 ($net.1: ranks 0, $net.2: ranks 1)" "$dir/plan.log" || { cat "$dir/plan.log"; fail "moe-launch does not place one rank per node"; }
grep -q "1 of 1 ep groups cross nodes" "$dir/plan.log" || { cat "$dir/plan.log"; fail "moe-launch does not report the ep group crossing nodes"; }

timeout 300 ip netns exec "$A" unshare --uts sh -c "hostname node-a; exec \"$LAUNCH\" $(micro_args "$dir/two") ${RUN[*]} --hostfile $dir/hosts --mpirun-args '$MCA'" \
  > "$dir/two.log" 2>&1 || { tail -30 "$dir/two.log"; fail "the two-node run failed"; }
grep -q "nodes: 2 (node-a: ranks 0, node-b: ranks 1)" "$dir/two.log" || { grep nodes "$dir/two.log"; fail "the trainer does not see its ranks on two nodes"; }
mpirun -np 2 "$TRAIN" $(micro_args "$dir/one") "${RUN[@]}" > "$dir/one.log" 2>&1 || { cat "$dir/one.log"; fail "the one-node run failed"; }
diff <(losses "$dir/one/metrics.jsonl") <(losses "$dir/two/metrics.jsonl") > /dev/null || fail "losses differ between two nodes and one"
echo "ok: dp2 + ep2 across two network namespaces (node-a, node-b; MPI over TCP on $net.0/24) equals the run on one node, 12 losses bit for bit"

# ---- The same two nodes as a Slurm cluster.
for tool in munged slurmctld slurmd sbatch srun scancel; do
  command -v "$tool" > /dev/null || skip "Slurm part: $tool not installed (scripts/setup.sh installs slurmd, slurmctld, slurm-client, munge); the mpirun part above passed"
done
dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 2> /dev/null; chmod 400 "$dir/munge.key"
munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
  --seed-file="$dir/munge.seed" || fail "munged did not start"
mkdir -p "$dir/state" "$dir/spool/node-a" "$dir/spool/node-b" "$dir/tmp/node-a" "$dir/tmp/node-b"
cat > "$dir/slurm.conf" <<CONF
ClusterName=fmoe
SlurmctldHost=node-a($net.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.%n.log
TmpFS=$dir/tmp/%n
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=node-a NodeAddr=$net.1 CPUs=2 State=UNKNOWN
NodeName=node-b NodeAddr=$net.2 CPUs=2 State=UNKNOWN
PartitionName=main Nodes=node-a,node-b Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
# nsenter --net, not ip netns exec (which remounts /sys under slurmd); each daemon under its node's host name.
nsenter --net=/var/run/netns/"$A" unshare --uts sh -c "hostname node-a; exec slurmctld -f $SLURM_CONF -i" || fail "slurmctld did not start"
nsenter --net=/var/run/netns/"$A" unshare --uts sh -c "hostname node-a; exec slurmd -f $SLURM_CONF -N node-a" || fail "slurmd node-a did not start"
nsenter --net=/var/run/netns/"$B" unshare --uts sh -c "hostname node-b; exec slurmd -f $SLURM_CONF -N node-b" || fail "slurmd node-b did not start"
in_a() { nsenter --net=/var/run/netns/"$A" "$@"; }
for _ in $(seq 1 100); do
  [ "$(in_a sinfo -h -o %t 2>/dev/null | sort -u)" = idle ] && break
  sleep 0.2
done
[ "$(in_a sinfo -h -o %D 2>/dev/null)" = 2 ] && [ "$(in_a sinfo -h -o %t)" = idle ] || { in_a sinfo; tail "$dir/slurmctld.log"; fail "the two Slurm nodes are not idle"; }
SBATCH_FILE="$(cd "$(dirname "$0")/../.." && pwd)/launch/slurm/train.sbatch"
SBATCH_ARGS=(--nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1)
export FMOE_BIN="$BIN_DIR" OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include="$net.0/24" OMPI_MCA_oob_tcp_if_include="$net.0/24"
abs_config="$(cd "$(dirname "$CONFIG")" && pwd)/micro.yaml"
train_args() { echo "$abs_config" --set "data.prefix=$CORPUS/gcide" --set "data.tokenizer=$CORPUS/tok.model" --set "training.run_dir=$1" "${RUN[@]}"; }

# srun --mpi=pmix, stopped with SIGTERM mid-run and submitted again.
RUN=(--set training.steps=150 --set training.eval_interval=0 --set training.checkpoint_interval=0 --set parallel.ep=2
     --set training.micro_batch_size=4 --set optimizer.warmup_steps=2)
job=$(in_a sbatch --parsable "${SBATCH_ARGS[@]}" -o "$dir/srun1.out" "$SBATCH_FILE" $(train_args "$dir/srun")) || fail "sbatch refused the job"
for _ in $(seq 1 600); do
  [ -f "$dir/srun/metrics.jsonl" ] && [ "$(grep -c . "$dir/srun/metrics.jsonl")" -ge 20 ] && break
  sleep 0.1
done
in_a scancel --signal=TERM "$job"  # to the job step's tasks, as --signal=TERM@120 and preemption do
for _ in $(seq 1 600); do
  in_a squeue -h -j "$job" 2> /dev/null | grep -q . || break
  sleep 0.1
done
grep -q "stopped at step" "$dir/srun1.out" || { tail "$dir/srun1.out"; fail "the ranks did not stop at a checkpoint on SIGTERM"; }
stopped=$(grep -c . "$dir/srun/metrics.jsonl")
timeout 300 nsenter --net=/var/run/netns/"$A" sbatch --wait "${SBATCH_ARGS[@]}" -o "$dir/srun2.out" "$SBATCH_FILE" $(train_args "$dir/srun") \
  > /dev/null || { tail "$dir/srun2.out"; fail "the resubmitted srun job failed"; }
grep -q "resumed from .*step_0*$stopped at step $stopped" "$dir/srun2.out" || { grep -i resum "$dir/srun2.out"; fail "the resubmitted job did not resume from step $stopped"; }
mpirun -np 2 "$TRAIN" $(micro_args "$dir/one400") "${RUN[@]}" > "$dir/one400.log" 2>&1 || { cat "$dir/one400.log"; fail "the one-node run failed"; }
diff <(losses "$dir/one400/metrics.jsonl") <(losses "$dir/srun/metrics.jsonl") > /dev/null || fail "sbatch + srun losses differ from one node"
echo "ok: sbatch train.sbatch (srun --mpi=pmix) on two Slurm nodes, SIGTERM at step $stopped, resubmitted: 150 losses equal to one node's"

# mpirun inside the allocation (moe-launch --slurm).
RUN=(--set training.steps=12 --set training.eval_interval=0 --set training.checkpoint_interval=0 --set parallel.ep=2
     --set training.micro_batch_size=4 --set optimizer.warmup_steps=2)
FMOE_LAUNCH=mpirun timeout 300 nsenter --net=/var/run/netns/"$A" sbatch --wait "${SBATCH_ARGS[@]}" -o "$dir/mpirun.out" \
  "$SBATCH_FILE" $(train_args "$dir/slurm_mpirun") > /dev/null || { tail "$dir/mpirun.out"; fail "the mpirun-in-allocation job failed"; }
grep -q "moe-launch: 2 ranks on 2 nodes (1 per node, from the Slurm allocation)" "$dir/mpirun.out" || { head "$dir/mpirun.out"; fail "moe-launch --slurm did not read the allocation"; }
grep -q "nodes: 2 (node-a: ranks 0, node-b: ranks 1)" "$dir/mpirun.out" || fail "the ranks are not on node-a and node-b"
diff <(losses "$dir/one/metrics.jsonl") <(losses "$dir/slurm_mpirun/metrics.jsonl") > /dev/null || fail "sbatch + mpirun losses differ from one node"
echo "ok: sbatch train.sbatch with mpirun inside the allocation (moe-launch --slurm): 12 losses equal to one node's"
