# Shared by scripts/cinder/cinder.sh and scripts/nova/nova.sh: messages, and services as process
# groups with pid files. The caller sets SELF (its name in messages), RUN (pid files), LOG (service
# output) and PORT_HINT (which variables move its ports) before sourcing this file.

say() { printf '%s: %s\n' "$SELF" "$*"; }
die() { printf '%s: ERROR: %s\n' "$SELF" "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- processes (pid files, process groups)
# Each service is started with setsid, so its pid is also its process group: `down` signals the group,
# which also takes the children (worker processes, privsep helpers, erl_child_setup).
pid_of() { [ -f "$RUN/$1.pid" ] && cat "$RUN/$1.pid" || true; }
alive() {
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "$2" "/proc/$pid/cmdline" 2>/dev/null
}
# start NAME MARKER CMD...: run CMD in its own session, output to $LOG/NAME.out, pid to $RUN/NAME.pid
start() {
  local name=$1 marker=$2; shift 2
  if alive "$name" "$marker"; then say "$name already running (pid $(pid_of "$name"))"; return 0; fi
  stop "$name" "$marker"   # its leader died: end what is left of its group (e.g. orphaned workers)
  setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  say "started $name (pid $!)"
}
stop() {  # stop NAME MARKER: SIGTERM (then SIGKILL) the process group in NAME's pid file, if it is ours
  local name=$1 marker=$2 pid i t0
  pid=$(pid_of "$name"); t0=$(now)
  if [ -z "$pid" ]; then return 0; fi
  if pgrp_alive "$pid" && ! pgrp_ours "$pid" "$marker"; then
    say "pid file of $name names process group $pid, which is not ours (stale after a reboot?): left alone"
  elif pgrp_alive "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do pgrp_alive "$pid" || break; sleep 0.2; done
    if pgrp_alive "$pid"; then
      say "$name did not stop on SIGTERM in 20 s: SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || true
      sleep 0.5
    fi
    say "stopped $name (pid $pid) in $(since "$t0") s"
  fi
  rm -f "$RUN/$name.pid"
}
# is any process (zombies aside: our orphans are reaped by whoever PID 1 is) left in process group $1?
pgrp_alive() { [ -n "$(ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/' | head -1)" ]; }
pgrp_ours() {  # pgrp_ours PGID MARKER: some process of the group has MARKER in its command line
  local p
  for p in $(ps -e -o pid=,pgid= | awk -v g="$1" '$2 == g {print $1}'); do
    grep -q -- "$2" "/proc/$p/cmdline" 2>/dev/null && return 0
  done
  return 1
}

port_free() {  # port_free PORT: nothing listens on 127.0.0.1:PORT (or on the wildcard)
  ! ss -Hltn "sport = :$1" | grep -q .
}
need_port() { port_free "$2" || die "port $2 (for $1) is taken by another process; set $PORT_HINT"; }

group_alive() { local pid; pid=$(pid_of "$1"); [ -n "$pid" ] && kill -0 -- "-$pid" 2>/dev/null; }
wait_for() {  # [WATCH=name:marker] wait_for SECONDS DESCRIPTION CMD...   (fails early if WATCH died)
  local limit=$1 what=$2 t0 watch=${WATCH:-}; shift 2; t0=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    # a service's group outlives the exec chain of its start script (erl -> beam.smp), whose
    # cmdline can be caught mid-exec under load: dead means no process is left in its group
    if [ -n "$watch" ] && ! alive "${watch%%:*}" "${watch#*:}" && ! group_alive "${watch%%:*}"; then
      tail -25 "$LOG/${watch%%:*}.out" >&2 || true
      die "${watch%%:*} died while waiting for $what (see $LOG/${watch%%:*}.*)"
    fi
    (( $(date +%s) - t0 < limit )) || die "timed out after ${limit}s waiting for $what"
    sleep 0.5
  done
}

# status_table NAME:MARKER...: each service's pid, the RSS of its whole process group (workers and
# privsep helpers included) and the ports it listens on; returns 3 if none of them runs
status_table() {
  local s marker pid rss any=0 total=0 pids ports
  printf '%-17s %-8s %-10s %s\n' SERVICE PID RSS_MiB LISTEN
  for s in "$@"; do
    marker=${s#*:}; s=${s%%:*}
    if alive "$s" "$marker"; then
      pid=$(pid_of "$s"); any=1
      rss=$(ps -e -o pgid=,rss= | awk -v g="$pid" '$1 == g {t += $2} END {printf "%.0f", t/1024}')
      pids=$(ps -e -o pid=,pgid= | awk -v g="$pid" '$2 == g {print $1}' | paste -sd'|')
      ports=$(ss -Hltnp 2>/dev/null | grep -E "pid=($pids)," | awk '{print $4}' | sort -u | paste -sd' ' || true)
      printf '%-17s %-8s %-10s %s\n' "$s" "$pid" "$rss" "$ports"
      total=$((total + rss))
    else
      printf '%-17s %-8s\n' "$s" "-"
    fi
  done
  ((any)) && printf '%-17s %-8s %-10s\n' total "" "$total"
  ((any)) || return 3
}
