#!/usr/bin/env bash
# A one-host SLURM cluster for trying launch/slurm.sh (and for its test): controller, compute daemon and
# munge on this machine, one node, one partition, no accounting database.
#
#   sudo launch/slurm_cluster.sh up       # install (Debian/Ubuntu: slurm-wlm, munge), configure, start; idempotent
#   launch/slurm_cluster.sh status        # prints "up" and the node state, or why it is not up (exit 1)
#   sudo launch/slurm_cluster.sh down     # stop the daemons this script started (packages and config stay)
#
# Needs root (packages, /etc/slurm, daemons) and apt-get. It refuses to touch an /etc/slurm/slurm.conf it
# did not write, so it never rewrites a real cluster's configuration. Settings chosen for a container or a VM
# without systemd or cgroup delegation: ProctrackType=proctrack/linuxproc (processes tracked by parent id),
# TaskPlugin=task/none, no GPUs (no gres.conf), SelectType=select/cons_tres with CR_CPU (a job may use some of
# the CPUs), and JobRequeue=1 so `sbatch --requeue` jobs come back. Two nodes on one host are not possible
# with the Debian build (it rejects a duplicate NodeHostName), so multi-node runs need real machines.
#
# Environment: SLURM_CLUSTER_NAME (default finetune), SLURM_PARTITION (default debug).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="${CONF_DIR}/slurm.conf"
MARKER="# written by finetune launch/slurm_cluster.sh"
RUN_DIR=/run/finetune-slurm
STATE_DIR=/var/spool/finetune-slurm
LOG_DIR=/var/log/finetune-slurm
NODE="$(hostname -s)"
CLUSTER="${SLURM_CLUSTER_NAME:-finetune}"
PARTITION="${SLURM_PARTITION:-debug}"

say() { echo "slurm_cluster: $*"; }
die() { echo "slurm_cluster: error: $*" >&2; exit 1; }

need_root() {
    [[ "$(id -u)" -eq 0 ]] || die "'$1' needs root (packages, /etc/slurm, daemons): run it with sudo"
}

running() {  # running PIDFILE: the daemon recorded there is alive (/proc, so that it works without root too)
    [[ -s "$1" ]] && [[ -d "/proc/$(cat "$1")" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "no apt-get: install slurm (slurmctld, slurmd, sbatch) and munge by hand"
    say "installing slurm-wlm and munge (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; } \
        || die "apt-get install slurm-wlm munge failed"
}

write_config() {
    if [[ -f "${CONF}" ]] && ! grep -qxF "${MARKER}" "${CONF}"; then
        die "${CONF} exists and was not written by this script; not touching a real cluster's configuration"
    fi
    local cpus memory
    cpus="$(nproc --all)"
    memory="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p "${CONF_DIR}" "${RUN_DIR}" "${STATE_DIR}/ctld" "${STATE_DIR}/d" "${LOG_DIR}"
    local wanted
    wanted="$(cat <<EOF
${MARKER}
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=${STATE_DIR}/ctld
SlurmdSpoolDir=${STATE_DIR}/d
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=30
NodeName=${NODE} CPUs=${cpus} RealMemory=${memory} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
)"
    if [[ ! -f "${CONF}" ]] || [[ "$(cat "${CONF}")" != "${wanted}" ]]; then
        printf '%s\n' "${wanted}" > "${CONF}"
        say "wrote ${CONF} (node ${NODE}, ${cpus} CPUs, partition ${PARTITION})"
    fi
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    say "starting munged"
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

start_daemons() {
    if ! running "${RUN_DIR}/slurmctld.pid"; then
        say "starting slurmctld"
        slurmctld
    fi
    if ! running "${RUN_DIR}/slurmd.pid"; then
        say "starting slurmd"
        slurmd
    fi
    local state=""
    for _ in $(seq 100); do
        state="$(sinfo -h -n "${NODE}" -o '%t' 2>/dev/null || true)"
        case "${state}" in
            idle* | mix* | alloc* | comp*) say "up: node ${NODE} ${state}, partition ${PARTITION}"; return ;;
            down* | drain* | fail*) scontrol update NodeName="${NODE}" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.3
    done
    die "the node did not come up (state '${state}'); see ${LOG_DIR}/slurmctld.log and slurmd.log"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    if running "$2"; then
        local pid
        pid="$(cat "$2")"
        say "stopping $1 (pid ${pid})"
        kill "${pid}"
        for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || return 0; sleep 0.2; done
        kill -9 "${pid}" 2>/dev/null || true
    fi
}

cmd_up() {
    need_root up
    install_packages
    write_config
    start_munge
    start_daemons
}

cmd_down() {
    need_root down
    if [[ -f "${CONF}" ]] && ! grep -qxF "${MARKER}" "${CONF}"; then
        die "${CONF} was not written by this script; not stopping a real cluster"
    fi
    stop_pidfile slurmd "${RUN_DIR}/slurmd.pid"
    stop_pidfile slurmctld "${RUN_DIR}/slurmctld.pid"
    stop_pidfile munged /run/munge/munged.pid
    say "down"
}

cmd_status() {
    command -v sinfo >/dev/null || { say "not installed (no sinfo); run: sudo $0 up"; exit 1; }
    running "${RUN_DIR}/slurmctld.pid" || { say "slurmctld is not running; run: sudo $0 up"; exit 1; }
    running "${RUN_DIR}/slurmd.pid" || { say "slurmd is not running; run: sudo $0 up"; exit 1; }
    local state
    state="$(sinfo -h -n "${NODE}" -o '%t' 2>/dev/null || true)"
    case "${state}" in
        idle* | mix* | alloc* | comp*) say "up: node ${NODE} ${state}" ;;
        *) say "node ${NODE} is '${state:-unknown}'"; exit 1 ;;
    esac
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
