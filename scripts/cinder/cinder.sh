#!/usr/bin/env bash
# A real OpenStack Cinder (29.0.0, from PyPI) on this one machine, for the OpenStack adapter's tests.
#
#   scripts/cinder/cinder.sh up       install what is missing, start everything, bootstrap, smoke test
#   scripts/cinder/cinder.sh down     stop everything it started (pid files), unmount the shares
#   scripts/cinder/cinder.sh status   what is running
#   scripts/cinder/cinder.sh env      shell exports + a clouds.yaml for clients
#   scripts/cinder/cinder.sh smoke    run smoke.py against a running stack
#
# All state lives under $XMS_CINDER_DIR (default /var/tmp/xms-cinder). Every service listens on
# 127.0.0.1 only. Runs as root (mounts loop images; no sudo, no rootwrap, no systemd).
# Services: epmd + RabbitMQ, MariaDB, cinder-volume (NFS driver, backends ssd and hdd, each "share" a
# loop-mounted ext4 image where the driver expects the NFS mount), cinder-scheduler, cinder-api.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=${XMS_CINDER_DIR:-/var/tmp/xms-cinder}
PROJECT=${XMS_CINDER_PROJECT:-0123456789abcdef0123456789abcdef}
API_PORT=${XMS_CINDER_API_PORT:-8776}
DB_PORT=${XMS_CINDER_DB_PORT:-3306}
RABBIT_PORT=${XMS_CINDER_RABBIT_PORT:-5672}
RABBIT_DIST_PORT=${XMS_CINDER_RABBIT_DIST_PORT:-25672}
EPMD_PORT=${XMS_CINDER_EPMD_PORT:-4369}
SHARE_SIZE=${XMS_CINDER_SHARE_SIZE:-8G}
HOST_NAME=xms-cinder            # cinder's [DEFAULT] host: volumes land on xms-cinder@<backend>#<pool>
BACKENDS=(ssd hdd)
RABBIT_NODE=xms-cinder@localhost

VENV=$DIR/venv
RUN=$DIR/run
LOG=$DIR/log
CONF=$DIR/cinder.conf
APT_PKGS=(rabbitmq-server mariadb-server mariadb-client nfs-common qemu-utils e2fsprogs curl)

SELF=cinder.sh PORT_HINT="XMS_CINDER_*_PORT"
# shellcheck source=../lib/services.sh
source "$HERE/../lib/services.sh"

share_of() { echo "127.0.0.1:/srv/xms-cinder-$1"; }          # the NFS "share" string of a backend
mnt_of() { echo "$DIR/mnt/$(printf '%s' "$(share_of "$1")" | md5sum | cut -c1-32)"; }

# ---------------------------------------------------------------- install
install_apt() {
  local missing=() p
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    # policy-rc.d / no systemd: the packages' own services are not started (we start ours by hand).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOG/apt.log" 2>&1 \
      || { tail -20 "$LOG/apt.log" >&2; die "apt-get install failed"; }
  fi
}

find_py311() {
  local c
  for c in python3.11 /usr/bin/python3.11 python3; do
    if command -v "$c" >/dev/null && [ "$("$c" -c 'import sys; print(sys.version_info[:2] == (3, 11))' 2>/dev/null)" = True ]; then
      echo "$c"; return 0
    fi
  done
  return 1
}

install_venv() {
  local py stamp
  stamp="$VENV/.installed-$(sha256sum "$HERE/requirements.txt" | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  py=$(find_py311) || die "Python 3.11 is required"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  say "pip install -r scripts/cinder/requirements.txt into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt" >"$LOG/pip.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$LOG/pip.log" | tail -20 >&2; die "pip install failed"; }
  "$VENV/bin/python" -W ignore -c 'import cinder, os_brick, openstack, pymysql' || die "the venv does not import cinder"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

# ---------------------------------------------------------------- config
write_configs() {
  mkdir -p "$DIR/rabbitmq/home" "$DIR/state/lock" "$DIR/mnt" "$DIR/shares" "$DIR/mysql"
  local b
  for b in "${BACKENDS[@]}"; do share_of "$b" >"$DIR/shares/$b"; done
  {
    cat <<EOF
# Written by scripts/cinder/cinder.sh (rewritten on every \`up\`).
[DEFAULT]
host = $HOST_NAME
my_ip = 127.0.0.1
state_path = $DIR/state
log_dir = $LOG
debug = false
transport_url = rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/
auth_strategy = noauth_include_project_id
enabled_backends = $(IFS=,; echo "${BACKENDS[*]}")
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = $API_PORT
osapi_volume_workers = 1
periodic_interval = 10
report_interval = 10
# cinder runs as root here: oslo.concurrency never prefixes a root helper for root, and privsep
# daemons are started directly by privsep-helper below (no sudo, no cinder-rootwrap).
use_multipath_for_image_xfer = false
# the wheel installs these under <venv>/etc/cinder, not /etc/cinder
api_paste_config = $VENV/etc/cinder/api-paste.ini
resource_query_filters_file = $VENV/etc/cinder/resource_filters.json

[database]
connection = mysql+pymysql://cinder:cinder@127.0.0.1:$DB_PORT/cinder?charset=utf8mb4

[oslo_concurrency]
lock_path = $DIR/state/lock

[coordination]
backend_url = file://$DIR/state/coordination

[privsep]
helper_command = $VENV/bin/privsep-helper --config-file $CONF

[cinder_sys_admin]
helper_command = $VENV/bin/privsep-helper --config-file $CONF

[privsep_osbrick]
helper_command = $VENV/bin/privsep-helper --config-file $CONF
EOF
    for b in "${BACKENDS[@]}"; do
      cat <<EOF

[$b]
volume_driver = cinder.volume.drivers.nfs.NfsDriver
volume_backend_name = $b
nfs_shares_config = $DIR/shares/$b
nfs_mount_point_base = $DIR/mnt
nfs_sparsed_volumes = true
nfs_snapshot_support = true
# snapshots need these false (the driver refuses snapshot support with secure NAS operations)
nas_secure_file_operations = false
nas_secure_file_permissions = false
EOF
    done
  } >"$CONF"

  # RabbitMQ: own node name, data dir, cookie, config; nothing from /etc/rabbitmq.
  : >"$DIR/rabbitmq/rabbitmq-env.conf"
  echo '[].' >"$DIR/rabbitmq/enabled_plugins"
  cat >"$DIR/rabbitmq/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$RABBIT_PORT
loopback_users.guest = true
disk_free_limit.absolute = 50MB
log.console = false
log.file.level = info
EOF
  if [ ! -s "$DIR/rabbitmq/home/.erlang.cookie" ]; then
    head -c 32 /dev/urandom | md5sum | cut -c1-20 | tr a-f A-F >"$DIR/rabbitmq/home/.erlang.cookie"
  fi
  chmod 400 "$DIR/rabbitmq/home/.erlang.cookie"
}

rabbit_env() {
  export HOME="$DIR/rabbitmq/home"
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq/rabbitmq-env.conf"
  export RABBITMQ_NODENAME="$RABBIT_NODE" RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$RABBIT_PORT" RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT"
  export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq/rabbitmq.conf"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/rabbitmq/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$DIR/rabbitmq/mnesia" RABBITMQ_LOG_BASE="$LOG/rabbitmq"
  export RABBITMQ_PID_FILE="$DIR/rabbitmq/rabbit.pid"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT="$EPMD_PORT"
}

# ---------------------------------------------------------------- services
mount_shares() {
  local b img mp
  mkdir -p "$DIR/images"
  for b in "${BACKENDS[@]}"; do
    img="$DIR/images/$b.ext4"; mp=$(mnt_of "$b")
    if [ ! -f "$img" ]; then
      truncate -s "$SHARE_SIZE" "$img"
      mkfs.ext4 -q -F -L "xms-$b" "$img"
    fi
    mkdir -p "$mp"
    if ! mountpoint -q "$mp"; then
      mount -o loop "$img" "$mp"
      say "mounted $img at $mp (share $(share_of "$b"))"
    fi
  done
}

start_rabbit() {
  ( rabbit_env
    if ! alive epmd epmd; then need_port epmd "$EPMD_PORT"; fi
    start epmd epmd epmd -address 127.0.0.1 -port "$EPMD_PORT"
    wait_for 20 "epmd on $EPMD_PORT" bash -c "ss -Hltn 'sport = :$EPMD_PORT' | grep -q ."
    if ! alive rabbitmq rabbit; then need_port rabbitmq "$RABBIT_PORT"; need_port rabbitmq-dist "$RABBIT_DIST_PORT"; fi
    mkdir -p "$LOG/rabbitmq"
    # RUNNING_UNDER_SYSTEMD makes the script exec erl (no signal-forwarding /bin/sh wrapper, which
    # was seen to vanish and leave beam.smp behind); beam.smp stops cleanly on SIGTERM.
    RUNNING_UNDER_SYSTEMD=true start rabbitmq rabbit /usr/lib/rabbitmq/bin/rabbitmq-server
    # The node registers with epmd only some seconds into its boot; rabbitmqctl fails at once
    # before that, so wait for the AMQP listener (opened at the end of boot) first.
    WATCH=rabbitmq:rabbit wait_for 120 "RabbitMQ on 127.0.0.1:$RABBIT_PORT" bash -c "ss -Hltn 'sport = :$RABBIT_PORT' | grep -q ."
    timeout 120 /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$RABBIT_NODE" await_startup --timeout 110 >/dev/null \
      || { tail -20 "$LOG/rabbitmq.out" >&2; die "RabbitMQ did not start"; }
  )
}

db() { mariadb --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot "$@"; }

start_mariadb() {
  if [ ! -d "$DIR/mysql/data/mysql" ]; then
    rm -rf "$DIR/mysql/data"
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
      --auth-root-authentication-method=socket --skip-test-db >"$LOG/mariadb-install-db.log" 2>&1 \
      || { tail -20 "$LOG/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
  fi
  if ! alive mariadb mariadbd; then need_port mariadb "$DB_PORT"; fi
  start mariadb mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --socket="$DIR/mysql/mysqld.sock" --pid-file="$DIR/mysql/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve --log-error="$LOG/mariadb.err" \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=48M --innodb-flush-log-at-trx-commit=2 \
    --max-connections=500 --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci
  WATCH=mariadb:mariadbd wait_for 60 "MariaDB" mariadb-admin --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot ping
  db -e "CREATE DATABASE IF NOT EXISTS cinder;
         CREATE USER IF NOT EXISTS 'cinder'@'127.0.0.1' IDENTIFIED BY 'cinder';
         CREATE USER IF NOT EXISTS 'cinder'@'localhost' IDENTIFIED BY 'cinder';
         GRANT ALL PRIVILEGES ON cinder.* TO 'cinder'@'127.0.0.1';
         GRANT ALL PRIVILEGES ON cinder.* TO 'cinder'@'localhost';"
}

count_ready() {
  local n; n=$(grep -c "Driver post RPC initialization completed successfully" "$LOG/cinder-volume.log" 2>/dev/null || true)
  echo "${n:-0}"
}

start_cinder() {
  "$VENV/bin/cinder-manage" --config-file "$CONF" db sync >"$LOG/db-sync.log" 2>&1 \
    || { tail -20 "$LOG/db-sync.log" >&2; die "cinder-manage db sync failed"; }

  # cinder-volume first, and wait until each backend's driver is up: a scheduler that starts
  # before the backends report refuses creates ("No valid backend was found") for up to a minute.
  if ! alive cinder-volume cinder-volume; then
    local before t0
    before=$(count_ready); t0=$(date +%s)
    start cinder-volume cinder-volume "$VENV/bin/cinder-volume" --config-file "$CONF"
    until (( $(count_ready) - before >= ${#BACKENDS[@]} )); do
      alive cinder-volume cinder-volume || { tail -30 "$LOG/cinder-volume.log" "$LOG/cinder-volume.out" >&2; die "cinder-volume died"; }
      (( $(date +%s) - t0 < 180 )) || { tail -30 "$LOG/cinder-volume.log" >&2; die "backends not initialized after 180 s"; }
      sleep 0.5
    done
    say "cinder-volume: ${#BACKENDS[@]} backends initialized"
  fi
  start cinder-scheduler cinder-scheduler "$VENV/bin/cinder-scheduler" --config-file "$CONF"
  if ! alive cinder-api cinder-api; then need_port cinder-api "$API_PORT"; fi
  start cinder-api cinder-api "$VENV/bin/cinder-api" --config-file "$CONF"
  WATCH=cinder-api:cinder-api wait_for 120 "cinder-api on 127.0.0.1:$API_PORT" \
    bash -c "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$API_PORT/ | grep -qE '^(200|300)$'"
}

write_clouds_yaml() {
  cat >"$DIR/clouds.yaml" <<EOF
# Written by scripts/cinder/cinder.sh. Cinder runs with auth_strategy = noauth_include_project_id:
# no Keystone; every request must carry "X-Auth-Token: admin:<project>" (user admin, always is_admin),
# version discovery included, which keystoneauth sends unauthenticated. So after
# openstack.connect(cloud="xms-dev") also set, before the first request:
#   conn.session.additional_headers["X-Auth-Token"] = conn.config.config["auth"]["token"]
# (scripts/cinder/xms_cinder_conn.py does this; see scripts/cinder/README.md).
clouds:
  xms-dev:
    auth_type: admin_token
    auth:
      endpoint: http://127.0.0.1:$API_PORT/v3/$PROJECT
      token: admin:$PROJECT
    block_storage_endpoint_override: http://127.0.0.1:$API_PORT/v3/$PROJECT
    block_storage_api_version: '3'
    region_name: RegionOne
    xms_project_id: $PROJECT
EOF
}

# ---------------------------------------------------------------- commands
cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (loop mounts)"
  local T0 t; T0=$(now)
  mkdir -p "$DIR" "$RUN" "$LOG"
  t=$(now); install_apt; say "apt: $(since "$t") s"
  t=$(now); install_venv; say "venv: $(since "$t") s"
  write_configs
  t=$(now); mount_shares; start_rabbit; say "rabbitmq: $(since "$t") s"
  t=$(now); start_mariadb; say "mariadb: $(since "$t") s"
  t=$(now); start_cinder; say "cinder services: $(since "$t") s"
  write_clouds_yaml
  t=$(now)
  PYTHONDONTWRITEBYTECODE=1 XMS_CINDER_DIR=$DIR "$VENV/bin/python" "$HERE/bootstrap.py" --endpoint "http://127.0.0.1:$API_PORT" --project "$PROJECT" \
    || die "bootstrap failed"
  say "bootstrap: $(since "$t") s"
  say "up: ready in $(since "$T0") s"
  cmd_smoke
}

cmd_smoke() {
  PYTHONDONTWRITEBYTECODE=1 XMS_CINDER_DIR=$DIR "$VENV/bin/python" "$HERE/smoke.py" --cloud xms-dev --clouds-yaml "$DIR/clouds.yaml" \
    || die "smoke test failed"
}

cmd_down() {
  local b mp
  # reverse order of start
  for s in cinder-api cinder-scheduler cinder-volume; do stop "$s" "$s"; done
  local t0
  t0=$(now)
  if alive mariadb mariadbd; then
    mariadb-admin --no-defaults --socket="$DIR/mysql/mysqld.sock" -uroot shutdown >/dev/null 2>&1 || true
  fi
  stop mariadb mariadbd
  say "mariadb down in $(since "$t0") s"
  t0=$(now)
  if alive rabbitmq rabbit; then
    ( rabbit_env; timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$RABBIT_NODE" stop >/dev/null 2>&1 || true )
  fi
  stop rabbitmq rabbit
  say "rabbitmq down in $(since "$t0") s"
  stop epmd epmd
  for b in "${BACKENDS[@]}"; do
    mp=$(mnt_of "$b")
    if mountpoint -q "$mp" 2>/dev/null; then
      umount "$mp" && say "unmounted $mp" || say "could not unmount $mp (busy?)"
    fi
    # loop devices from `mount -o loop` auto-clear; detach any left over for our image
    losetup -j "$DIR/images/$b.ext4" 2>/dev/null | cut -d: -f1 | while read -r dev; do losetup -d "$dev" || true; done
  done
  say "down"
}

cmd_status() {
  local rc=0 b mp
  status_table epmd:epmd rabbitmq:rabbit mariadb:mariadbd cinder-volume:cinder-volume \
    cinder-scheduler:cinder-scheduler cinder-api:cinder-api || rc=$?
  for b in "${BACKENDS[@]}"; do
    mp=$(mnt_of "$b")
    if mountpoint -q "$mp" 2>/dev/null; then echo "share $b: $(share_of "$b") mounted at $mp ($(df -h --output=used,size "$mp" | tail -1 | xargs))"
    else echo "share $b: not mounted"; fi
  done
  return $rc
}

cmd_env() {
  mkdir -p "$DIR"; write_clouds_yaml
  cat <<EOF
# eval "\$(scripts/cinder/cinder.sh env)"
export XMS_CINDER_DIR=$DIR
export XMS_CINDER_ENDPOINT=http://127.0.0.1:$API_PORT/v3
export XMS_CINDER_PROJECT=$PROJECT
export XMS_CINDER_TOKEN=admin:$PROJECT
export XMS_CINDER_PYTHON=$VENV/bin/python
export OS_CLIENT_CONFIG_FILE=$DIR/clouds.yaml
export OS_CLOUD=xms-dev
# $DIR/clouds.yaml:
EOF
  sed 's/^/#   /' "$DIR/clouds.yaml"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  smoke) cmd_smoke ;;
  *) echo "usage: $0 up|down|status|env|smoke" >&2; exit 2 ;;
esac
