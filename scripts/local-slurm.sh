#!/usr/bin/env bash
# local-slurm.sh - a real single-node Slurm cluster on this machine, for tests.
#   Debian 12 (slurm-wlm 22.05.8), root, no systemd, loopback only.
#
# Usage:
#   eval "$(bash local-slurm.sh up)"     # install if needed, start, wait for the node to be idle,
#                                         # print the env lines (SLURM_CONF, PATH) on stdout
#   bash local-slurm.sh status            # daemons, sinfo, squeue (rc 0 when up)
#   bash local-slurm.sh env               # print the env lines again
#   bash local-slurm.sh down              # cancel jobs, stop the daemons this script started (by pid)
#   bash local-slurm.sh restart           # down + up
#
# Settings (environment):
#   LOCAL_SLURM_DIR        all state, config, logs          [/tmp/local-slurm]   (wiped by "up")
#   LOCAL_SLURM_AUTH       munge | none                     [munge]  (auth/none exists in 22.05 only,
#                                                                     gone from Slurm >= 23.11)
#   LOCAL_SLURM_ACCOUNTING shim | db                        [db]
#       shim: no database. AccountingStorageType=none; a `sacct` shim in $DIR/bin (put first in PATH)
#             answers from squeue, so submitit's job.state / done() / cancel work.
#       db:   slurmdbd + a private MariaDB (apt: slurmdbd mariadb-server, ~27 MB more): real sacct.
#   LOCAL_SLURM_NODE       node name                        [$(hostname -s)]
#   LOCAL_SLURM_CTLD_PORT / _SLURMD_PORT / _DBD_PORT / _DB_PORT   [6817 / 6818 / 6819 / 3307]
#   LOCAL_SLURM_FIRST_JOB_ID   first job id; "time" = derived from the clock so that ids do not
#                              repeat across restarts (stale submitit folders!)   [time]
#   LOCAL_SLURM_TIMEOUT    seconds to wait for the node to become idle          [60]
#   LOCAL_SLURM_CPUS       CPUs the node advertises (SlurmdParameters=config_overrides), e.g. 8
#                          to run 8 one-CPU jobs at once on 2 cores            [real count]
#   LOCAL_SLURM_GPUS       fake GPUs (generic resources gpu:N, N <= 6) on the node, for routing tests:
#                          each is an existing device file (/dev/zero, /dev/full, ...); jobs that ask
#                          for --gres=gpu:1 get CUDA_VISIBLE_DEVICES set by Slurm          [0: none]
#   LOCAL_SLURM_NO_INSTALL=1   never call apt-get (fail if binaries are missing)
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/local-slurm}
AUTH=${LOCAL_SLURM_AUTH:-munge}
ACCT=${LOCAL_SLURM_ACCOUNTING:-db}
NODE=${LOCAL_SLURM_NODE:-$(hostname -s)}
CTLD_HOST=$(hostname -s)   # slurmctld only runs where SlurmctldHost is its own hostname
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${LOCAL_SLURM_DBD_PORT:-6819}
DB_PORT=${LOCAL_SLURM_DB_PORT:-3307}
FIRST_JOB_ID=${LOCAL_SLURM_FIRST_JOB_ID:-time}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CPUS=${LOCAL_SLURM_CPUS:-}     # e.g. 8: node advertises 8 CPUs on a 2-core machine
GPUS=${LOCAL_SLURM_GPUS:-0}    # fake GPUs: gres/gpu on device files that exist everywhere
CONF=$DIR/etc/slurm.conf
MUNGE_SOCK=$DIR/munge-sock/munge.socket

log() { echo "[local-slurm] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

# ---------------------------------------------------------------- pids (ours only)
# Each daemon runs in the foreground (-D/-F) as a child of this script; its pid goes to
# $DIR/pids/NAME.pid. We only ever signal a pid whose /proc/PID/comm is the expected name.
pid_of() { local f=$DIR/pids/$1.pid; [ -s "$f" ] && cat "$f" || true; }
alive() {
  local pid st; pid=$(pid_of "$1"); [ -n "$pid" ] || return 1
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$2" ] || return 1
  st=$(sed 's/.*) //' /proc/"$pid"/stat 2>/dev/null | cut -d' ' -f1)
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]   # an exited daemon not yet reaped by init is a zombie
}
start_bg() {   # start_bg NAME cmd args...
  local name=$1; shift
  # close inherited fds >2 (a caller's pipe must not be held open by a daemon), then exec
  ( for fd in /proc/$BASHPID/fd/*; do fd=${fd##*/}; [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"; done
    exec nohup "$@" ) </dev/null >"$DIR/log/$name.out" 2>&1 &
  echo $! >"$DIR/pids/$name.pid"
}
stop_one() {   # stop_one NAME COMM
  alive "$1" "$2" || { rm -f "$DIR/pids/$1.pid"; return 0; }
  local pid; pid=$(pid_of "$1")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do alive "$1" "$2" || break; sleep 0.1; done
  if alive "$1" "$2"; then log "$1 ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$DIR/pids/$1.pid"
  log "stopped $1 (pid $pid)"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

print_env() {
  echo "export SLURM_CONF=$CONF"
  if [ "$ACCT_MODE" = shim ]; then echo "export PATH=$DIR/bin:\$PATH"; fi
}

# ---------------------------------------------------------------- install
install_pkgs() {
  local pkgs=()
  command -v slurmctld >/dev/null || pkgs+=(slurmctld)
  command -v slurmd    >/dev/null || pkgs+=(slurmd)
  command -v sbatch    >/dev/null || pkgs+=(slurm-client)
  if [ "$AUTH" = munge ]; then command -v munged >/dev/null || pkgs+=(munge); fi
  if [ "$ACCT" = db ]; then
    command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
    command -v mariadbd >/dev/null || pkgs+=(mariadb-server)
  fi
  [ ${#pkgs[@]} -eq 0 ] && return 0
  [ "${LOCAL_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${pkgs[*]}"
  local t0; t0=$(now)
  log "apt-get install ${pkgs[*]}"
  apt-get update -qq >"/tmp/local-slurm-apt.log" 2>&1 || { tail -20 /tmp/local-slurm-apt.log >&2; die "apt-get update failed"; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" \
      >>"/tmp/local-slurm-apt.log" 2>&1 || { tail -30 /tmp/local-slurm-apt.log >&2; die "apt-get install failed"; }
  log "installed in $(since "$t0")s"
}

# ---------------------------------------------------------------- config
write_conf() {
  local hw mem cpus first extra="# SlurmdParameters=config_overrides (see LOCAL_SLURM_CPUS)"
  hw=$(env -u SLURM_CONF slurmd -C | head -1)   # NodeName=x CPUs=2 Boards=1 SocketsPerBoard=1 ... RealMemory=24105
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  cpus=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=.*//' <<<"$hw")
  mem=$(( mem * 9 / 10 ))
  if [ -n "$CPUS" ]; then   # advertise more CPUs than the machine has (oversubscribe on purpose)
    cpus="CPUs=$CPUS"; extra="SlurmdParameters=config_overrides"
  fi
  if [ "$FIRST_JOB_ID" = time ]; then first=$(( ($(date +%s) % 600000) * 100 + 1 )); else first=$FIRST_JOB_ID; fi
  cat >"$CONF" <<EOF
# generated by local-slurm.sh - single node, everything on 127.0.0.1
ClusterName=localcluster
SlurmctldHost=${CTLD_HOST}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: plain process tracking, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# batch_sched_delay=0: schedule every submission at once (default 3 s batches them: ~2.5 s latency)
SchedulerParameters=batch_sched_delay=0
# cancel (instead of leaving PENDING forever) jobs whose dependency can never be satisfied
DependencyParameters=kill_invalid_depend
# a scancel'ed submitit job ignores SIGTERM; default 30 s would keep its CPU busy that long
KillWait=2
# keep finished jobs visible to squeue/scontrol (and the sacct shim) for an hour
MinJobAge=3600
FirstJobId=${first}
ReturnToService=2
MailProg=/bin/true
EOF
  if [ "$AUTH" = munge ]; then
    cat >>"$CONF" <<EOF
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCK}
EOF
  else
    cat >>"$CONF" <<EOF
AuthType=auth/none
CredType=cred/none
EOF
  fi
  if [ "$ACCT" = db ]; then
    cat >>"$CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${DBD_PORT}
EOF
    # the slurmctld -> slurmdbd connection takes its munge socket from AccountingStoragePass
    [ "$AUTH" = munge ] && echo "AccountingStoragePass=${MUNGE_SOCK}" >>"$CONF"
  else
    echo "AccountingStorageType=accounting_storage/none" >>"$CONF"
  fi
  local gres=""
  if [ "$GPUS" -gt 0 ]; then
    local devices=(/dev/zero /dev/full /dev/null /dev/random /dev/urandom /dev/tty) i
    [ "$GPUS" -le ${#devices[@]} ] || die "LOCAL_SLURM_GPUS=$GPUS: at most ${#devices[@]} fake GPUs"
    echo "GresTypes=gpu" >>"$CONF"
    : >"$DIR/etc/gres.conf"
    for ((i = 0; i < GPUS; i++)); do echo "Name=gpu File=${devices[$i]}" >>"$DIR/etc/gres.conf"; done
    gres="Gres=gpu:${GPUS}"
  fi
  cat >>"$CONF" <<EOF
${extra}
NodeName=${NODE} NodeAddr=127.0.0.1 ${cpus} RealMemory=${mem} ${gres} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
}

write_sacct_shim() {
  cat >"$DIR/bin/sacct" <<EOF
#!/usr/bin/env bash
# sacct shim (local-slurm.sh, accounting=shim): there is no slurmdbd, so answer the queries
# submitit makes (sacct -o JobID,State,NodeList --parsable2 -j ID ...) from slurmctld's
# in-memory job table via squeue (finished jobs stay there MinJobAge=3600 s).
export SLURM_CONF=\${SLURM_CONF:-$CONF}
EOF
  cat >>"$DIR/bin/sacct" <<'EOF'
fields="JobID,State,NodeList"; jobs=(); header=1
while [ $# -gt 0 ]; do
  case "$1" in
    -o|--format) fields="$2"; shift 2;;
    --format=*) fields="${1#--format=}"; shift;;
    -o*) fields="${1#-o}"; shift;;
    -j|--jobs) jobs+=("$2"); shift 2;;
    --jobs=*) jobs+=("${1#--jobs=}"); shift;;
    -j*) jobs+=("${1#-j}"); shift;;
    -n|--noheader) header=0; shift;;
    *) shift;;   # --parsable2, -X, --allusers, -S ... are accepted and ignored
  esac
done
fmt=""; IFS=',' read -ra names <<< "$fields"
for f in "${names[@]}"; do
  f="${f%%%*}"
  case "${f,,}" in
    jobid) c=%i;; jobidraw) c=%A;; state) c=%T;; nodelist) c=%N;; jobname) c=%j;;
    partition) c=%P;; user) c=%u;; elapsed) c=%M;; reason) c=%r;; ncpus|alloccpus) c=%C;;
    *) c="";;
  esac
  fmt="${fmt:+$fmt|}$c"
done
[ $header = 1 ] && (IFS='|'; echo "${names[*]}")
if [ ${#jobs[@]} -eq 0 ]; then exec squeue -h -t all -o "$fmt"; fi
ids=$(IFS=','; echo "${jobs[*]}"); IFS=',' read -ra idlist <<< "$ids"
# one id at a time: an id that slurmctld has already forgotten must not hide the others
for id in "${idlist[@]}"; do squeue -h -t all -j "$id" -o "$fmt" 2>/dev/null || true; done
exit 0
EOF
  chmod +x "$DIR/bin/sacct"
}

# ---------------------------------------------------------------- up / down / status
cmd_up() {
  if alive slurmctld slurmctld && alive slurmd slurmd; then
    ACCT_MODE=$(cat "$DIR/mode" 2>/dev/null || echo "$ACCT")
    log "already up ($DIR)"; print_env; return 0
  fi
  cmd_down >/dev/null 2>&1 || true          # leftovers of a half-started cluster (ours only)
  case "$AUTH" in munge|none) ;; *) die "LOCAL_SLURM_AUTH must be munge or none";; esac
  case "$ACCT" in shim|db) ;; *) die "LOCAL_SLURM_ACCOUNTING must be shim or db";; esac
  install_pkgs
  if [ "$AUTH" = none ] && ! ls /usr/lib/*/slurm-wlm/auth_none.so >/dev/null 2>&1; then
    die "this Slurm has no auth/none plugin; use LOCAL_SLURM_AUTH=munge"
  fi
  local t0; t0=$(now)
  rm -rf "$DIR"
  mkdir -p "$DIR"/{etc,state,spool,log,run,pids,bin,munge,munge-sock}
  chmod 700 "$DIR/munge"; chmod 755 "$DIR/munge-sock"
  echo "$ACCT" >"$DIR/mode"; ACCT_MODE=$ACCT
  write_conf
  export SLURM_CONF=$CONF

  if [ "$AUTH" = munge ]; then
    mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
      || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 2>/dev/null; chmod 600 "$DIR/munge/munge.key"; }
    # -f: allow running as root with a key/socket under /tmp
    start_bg munged munged -F -f --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" \
      --log-file="$DIR/log/munged.log" --pid-file="$DIR/run/munged.pid" --seed-file="$DIR/munge/munged.seed"
    for _ in $(seq 1 50); do [ -S "$MUNGE_SOCK" ] && break; alive munged munged || break; sleep 0.1; done
    [ -S "$MUNGE_SOCK" ] || { cat "$DIR/log/munged.out" >&2; die "munged did not start"; }
  fi

  if [ "$ACCT" = db ]; then
    mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
      --skip-test-db >"$DIR/log/mariadb-install-db.log" 2>&1 || { tail -20 "$DIR/log/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    start_bg mariadbd mariadbd --no-defaults --datadir="$DIR/db" --socket="$DIR/run/mysqld.sock" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --user=root --pid-file="$DIR/run/mysqld.pid" \
      --log-error="$DIR/log/mysqld.err" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 --skip-log-bin
    for _ in $(seq 1 300); do mariadb-admin --no-defaults --socket="$DIR/run/mysqld.sock" -uroot ping >/dev/null 2>&1 && break; alive mariadbd mariadbd || break; sleep 0.1; done
    alive mariadbd mariadbd || { tail -20 "$DIR/log/mysqld.err" >&2; die "mariadbd did not start"; }
    mariadb --no-defaults --socket="$DIR/run/mysqld.sock" -uroot -e \
      "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    cat >"$DIR/etc/slurmdbd.conf" <<EOF
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=${DBD_PORT}
SlurmUser=root
DebugLevel=info
LogFile=${DIR}/log/slurmdbd.log
PidFile=${DIR}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${DB_PORT}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    if [ "$AUTH" = munge ]; then
      printf 'AuthType=auth/munge\nAuthInfo=socket=%s\n' "$MUNGE_SOCK" >>"$DIR/etc/slurmdbd.conf"
    else
      echo 'AuthType=auth/none' >>"$DIR/etc/slurmdbd.conf"
    fi
    chmod 600 "$DIR/etc/slurmdbd.conf"       # slurmdbd refuses a readable config
    start_bg slurmdbd slurmdbd -D            # reads slurmdbd.conf next to $SLURM_CONF
    for _ in $(seq 1 300); do port_open "$DBD_PORT" && break; alive slurmdbd slurmdbd || break; sleep 0.1; done
    port_open "$DBD_PORT" || { tail -20 "$DIR/log/slurmdbd.out" >&2; die "slurmdbd did not start"; }
  else
    write_sacct_shim
  fi

  start_bg slurmctld slurmctld -D -f "$CONF"
  start_bg slurmd slurmd -D -N "$NODE" -f "$CONF"

  local deadline state=""
  deadline=$(( $(date +%s) + TIMEOUT ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    alive slurmctld slurmctld || { tail -20 "$DIR/log/slurmctld.out" >&2; die "slurmctld exited"; }
    alive slurmd slurmd       || { tail -20 "$DIR/log/slurmd.out" >&2; die "slurmd exited"; }
    state=$(timeout 5 sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $NODE not idle after ${TIMEOUT}s (state: '${state}')"
  fi
  log "up: node $NODE idle $(since "$t0")s after start (auth=$AUTH accounting=$ACCT dir=$DIR)"
  print_env
}

cmd_down() {
  [ -d "$DIR/pids" ] || { log "nothing to stop ($DIR)"; return 0; }
  export SLURM_CONF=$CONF
  if alive slurmctld slurmctld; then
    local ids
    ids=$(timeout 5 squeue -h -t pending,running,suspended,completing -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ -n "${ids// /}" ]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      timeout 10 scancel $ids 2>/dev/null || true
      for _ in $(seq 1 100); do   # KillWait=2 s, so this is normally quick
        [ -z "$(timeout 5 squeue -h -t running,completing -o %A 2>/dev/null || true)" ] && break; sleep 0.1
      done
    fi
  fi
  if alive slurmd slurmd; then
    # job processes still tracked by our slurmd (proctrack/linuxproc), killed by pid
    local jp
    jp=$(timeout 5 scontrol listpids 2>/dev/null | awk 'NR>1 && $1 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' ' || true)
    # shellcheck disable=SC2086
    [ -n "${jp// /}" ] && { log "killing leftover job pids: $jp"; kill -KILL $jp 2>/dev/null || true; }
  fi
  stop_one slurmd slurmd
  stop_one slurmctld slurmctld
  stop_one slurmdbd slurmdbd
  stop_one mariadbd mariadbd
  stop_one munged munged
  return 0
}

cmd_status() {
  local rc=0 n c
  for n in munged:munged mariadbd:mariadbd slurmdbd:slurmdbd slurmctld:slurmctld slurmd:slurmd; do
    c=${n#*:}; n=${n%%:*}
    if alive "$n" "$c"; then echo "$n: running (pid $(pid_of "$n"))"
    elif [ -n "$(pid_of "$n")" ]; then echo "$n: DEAD (pid $(pid_of "$n"))"; rc=1
    fi
  done
  alive slurmctld slurmctld && alive slurmd slurmd || { echo "cluster: down ($DIR)"; return 1; }
  export SLURM_CONF=$CONF
  timeout 5 sinfo || rc=1
  timeout 5 squeue || rc=1
  return $rc
}

ACCT_MODE=$(cat "$DIR/mode" 2>/dev/null || echo "$ACCT")
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  restart) cmd_down; cmd_up ;;
  status) cmd_status ;;
  env) print_env ;;
  *) echo "usage: $0 up|down|restart|status|env" >&2; exit 2 ;;
esac
