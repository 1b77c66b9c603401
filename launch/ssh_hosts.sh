#!/usr/bin/env bash
# Emulated ssh hosts on this one machine, for tests and for trying the launchers that start other nodes over ssh
# without a cluster (the deepspeed launcher through pdsh, Open MPI's and MPICH's mpirun): an sshd on a loopback port that accepts
# one generated key, host names node0..node{N-1} all reaching it, and an `ssh` on PATH that knows them.
#
#   launch/ssh_hosts.sh up [HOSTS]    # install OpenSSH, pdsh, Open MPI, MPICH if missing (root); start sshd, hostfile
#   eval "$(launch/ssh_hosts.sh env)" # PATH with that ssh first; then, e.g.:
#   bigmodel launch --launcher deepspeed --hostfile "$BIGMODEL_SSH_DIR/hostfile" --nnodes 2 --nproc 2 --config ...
#   mpirun --host node0:2,node1:2 -np 4 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 python -m bigmodel.train ...
#   launch/ssh_hosts.sh down          # stop the sshd it started and clean up
#
# Everything lives under $BIGMODEL_SSH_DIR (default /tmp/bigmodel-ssh); sshd listens on 127.0.0.1:$BIGMODEL_SSH_PORT
# (default 2222). Nothing outside that folder changes: ~/.ssh and the system's sshd are left alone.
set -euo pipefail

DIR=${BIGMODEL_SSH_DIR:-/tmp/bigmodel-ssh}
PORT=${BIGMODEL_SSH_PORT:-2222}
PACKAGES=(openssh-server openssh-client pdsh openmpi-bin mpich)

die() { echo "ssh_hosts: $*" >&2; exit 1; }

# shellcheck source=launch/packages.sh
source "$(dirname "${BASH_SOURCE[0]}")/packages.sh"

up() {
    local hosts=${1:-2} names=() i
    install_packages "sshd ssh ssh-keygen pdsh mpiexec.openmpi mpiexec.hydra" "${PACKAGES[@]}"
    [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null && die "already up ($DIR); run down first"
    rm -rf "$DIR" && mkdir -p "$DIR/bin" && chmod 700 "$DIR"
    ssh-keygen -q -t ed25519 -N '' -f "$DIR/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$DIR/client_key"
    for ((i = 0; i < hosts; i++)); do names+=("node$i"); echo "node$i slots=1" >>"$DIR/hostfile"; done
    # StrictModes off: the folder may sit under a world-writable /tmp, which sshd otherwise refuses for the key.
    cat >"$DIR/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $PORT
HostKey $DIR/host_key
AuthorizedKeysFile $DIR/client_key.pub
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile $DIR/sshd.pid
EOF
    cat >"$DIR/ssh_config" <<EOF
Host ${names[*]}
  HostName 127.0.0.1
  Port $PORT
  User $(id -un)
  IdentityFile $DIR/client_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec %s -F %s "$@"\n' "$(command -v ssh)" "$DIR/ssh_config" >"$DIR/bin/ssh"
    chmod +x "$DIR/bin/ssh"
    [ "$(id -u)" -ne 0 ] || mkdir -p /run/sshd  # privilege separation directory, root only
    "$(PATH=$PATH:/usr/sbin command -v sshd)" -f "$DIR/sshd_config" -E "$DIR/sshd.log"
    for _ in $(seq 50); do
        "$DIR/bin/ssh" -o ConnectTimeout=2 node0 true 2>/dev/null && { echo "ssh_hosts: ${names[*]} up ($DIR)"; return; }
        sleep 0.1
    done
    die "sshd did not accept the key (see $DIR/sshd.log)"
}

down() {
    if [ -f "$DIR/sshd.pid" ]; then kill "$(cat "$DIR/sshd.pid")" 2>/dev/null || true; fi
    rm -rf "$DIR"
}

case "${1:-}" in
    up) up "${2:-2}" ;;
    env) echo "export PATH=$DIR/bin:\$PATH BIGMODEL_SSH_DIR=$DIR" ;;
    down) down ;;
    *) die "usage: $0 up [HOSTS] | env | down" ;;
esac
