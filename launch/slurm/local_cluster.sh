#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying `bigmodel slurm` without a cluster:
# munge, one slurmctld and N slurmd daemons, each slurmd an emulated node (node1..nodeN) at 127.0.0.1.
#
#   launch/slurm/local_cluster.sh up [NODES]   # install the Debian packages if missing (root), start, wait for idle
#   eval "$(launch/slurm/local_cluster.sh env)" # SLURM_CONF for sbatch, squeue, scontrol, bigmodel slurm ...
#   launch/slurm/local_cluster.sh status
#   launch/slurm/local_cluster.sh down         # stop the daemons it started (by their pid files) and clean up
#
# Needs root (the daemons and jobs run as root) and Debian/Ubuntu packages slurmctld, slurmd, slurm-client, munge.
# Everything lives under $BIGMODEL_SLURM_DIR (default /tmp/bigmodel-slurm). Measured facts behind the settings:
# shared/notes/slurm-local.md.
set -euo pipefail

DIR=${BIGMODEL_SLURM_DIR:-/tmp/bigmodel-slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${BIGMODEL_SLURM_PORT:-6817}  # slurmctld; the slurmd daemons listen on the next ports
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_cluster: $*" >&2; exit 1; }

# shellcheck source=launch/packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/../packages.sh"

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is already serving this machine; use it, and leave it running on `down`
    fi
    [ -f /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$DIR/munged.pid"  # ours: `down` stops it
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    local nodes=$1 host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / nodes ))
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    for i in $(seq "$nodes"); do mkdir -p "$DIR/spool/node$i"; done
    cat >"$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh: $nodes emulated nodes on $host.
ClusterName=bigmodel-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=5
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1))-$((CTLD_PORT + nodes)) CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local nodes=$1 states
    for _ in $(seq 300); do
        states=$(SLURM_CONF=$CONF sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | tr -s ' ')
        [ "$states" = " $nodes idle" ] && return
        sleep 0.1
    done
    die "nodes not idle after 30 s (sinfo: $states); see $DIR/log/"
}

up() {
    local nodes=${1:-2}
    [ "$(id -u)" -eq 0 ] || die "needs root (the daemons run as root)"
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "local_cluster: already up ($CONF)" >&2
        return
    fi
    install_packages "slurmctld slurmd sbatch munged" "${PACKAGES[@]}"
    export PATH=$PATH:/usr/sbin
    mkdir -p "$DIR"
    start_munge
    write_conf "$nodes"
    slurmctld -f "$CONF" -i  # -i: ignore state left by an earlier cluster in $DIR
    for i in $(seq "$nodes"); do slurmd -f "$CONF" -N "node$i"; done
    wait_idle "$nodes"
    echo "local_cluster: $nodes nodes idle; eval \"\$($0 env)\" to use it" >&2
}

stop_pidfile() {
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
}

down() {
    [ -d "$DIR" ] || return 0
    if [ -f "$CONF" ] && [ -f "$DIR/slurmctld.pid" ]; then
        SLURM_CONF=$CONF PATH=$PATH:/usr/sbin scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    for file in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do stop_pidfile "$file"; done
    rm -rf "$DIR"
}

case ${1:-} in
    up) up "${2:-2}" ;;
    down) down ;;
    env) echo "export SLURM_CONF=$CONF PATH=\$PATH:/usr/sbin" ;;
    status) SLURM_CONF=$CONF sinfo -N && SLURM_CONF=$CONF squeue ;;
    *) die "usage: $0 up [NODES] | env | status | down" ;;
esac
