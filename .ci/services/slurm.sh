#!/usr/bin/env bash
# A real single-node Slurm for the tests: Debian's slurm-wlm and munge, a slurm.conf written for
# this host (MaxArraySize 3, so a 4-task array is split as on a real cluster), daemons started
# without systemd. Needs root.
#
#   .ci/services/slurm.sh start    install if missing, configure, start, wait until the node is idle
#   .ci/services/slurm.sh stop     cancel every job, stop the daemons
#   .ci/services/slurm.sh status   exit 0 when jobs can be submitted
set -euo pipefail

state=${JC_SLURM_DIR:-/tmp/jc-slurm}
conf=/etc/slurm/slurm.conf
mark="# written by jestcurate's .ci/services/slurm.sh"

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
    if [ -f "$conf" ] && ! grep -qF "$mark" "$conf"; then
        echo "slurm.sh: $conf exists and is not ours; not touching it" >&2
        exit 1
    fi
    mkdir -p /etc/slurm "$state"/{spool,state,log}
    cat >"$conf" <<EOF
$mark
ClusterName=jestcurate
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/state
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
MaxArraySize=3
KillWait=5
MinJobAge=300
JobCompType=jobcomp/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chmod 400 /etc/munge/munge.key
}

ready() {
    timeout 10 sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

running() {  # by pid file: slurmctld's helper process carries the same command name
    [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null
}

start() {
    install
    configure
    pgrep -x munged >/dev/null || munged --force
    running slurmctld || slurmctld
    running slurmd || slurmd
    for _ in $(seq 1 60); do
        if ready; then
            echo "slurm: $(sinfo -h -o '%P %T %N')"
            return
        fi
        timeout 5 scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm.sh: the node never became idle; see $state/log" >&2
    exit 1
}

stop() {
    scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
    for daemon in slurmd slurmctld; do
        running "$daemon" && kill "$(cat "$state/$daemon.pid")"
    done
    sleep 1
    pkill -x slurmctld 2>/dev/null || true  # its script helper, if left
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) ready ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
