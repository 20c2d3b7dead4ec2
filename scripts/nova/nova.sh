#!/usr/bin/env bash
# A real OpenStack Nova 34.0.0 + Neutron 29.0.0 + Placement 16.0.0 (from PyPI, the same series as
# Cinder 29.0.0) next to the Cinder of scripts/cinder/cinder.sh, for the OpenStack adapter's tests.
#
#   scripts/nova/nova.sh up       (cinder.sh up if Cinder is not running), install, start, bootstrap, smoke
#   scripts/nova/nova.sh down     stop what this script started (Cinder is left running)
#   scripts/nova/nova.sh status   what is running
#   scripts/nova/nova.sh env      shell exports + a clouds.yaml (compute + network + block-storage)
#   scripts/nova/nova.sh smoke    run smoke.py against a running stack
#
# Only the hypervisor is fake: nova-compute runs nova's in-tree fake virt driver (fake.FakeDriver).
# Neutron is ML2 with an agentless mechanism driver that binds every port. No Keystone: a
# small paste filter (shims/xms_nova_shims/noauth.py) turns "X-Auth-Token: user:project" into identity
# headers for nova-api and neutron; placement runs its own noauth2. MariaDB and RabbitMQ are Cinder's
# (own databases, RabbitMQ vhost "/", own exchanges). State under $XMS_NOVA_DIR (default /var/tmp/xms-nova).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CINDER_SH=$HERE/../cinder/cinder.sh
DIR=${XMS_NOVA_DIR:-/var/tmp/xms-nova}
CINDER_DIR=${XMS_CINDER_DIR:-/var/tmp/xms-cinder}
PROJECT=${XMS_CINDER_PROJECT:-0123456789abcdef0123456789abcdef}
CINDER_API_PORT=${XMS_CINDER_API_PORT:-8776}
DB_PORT=${XMS_CINDER_DB_PORT:-3306}
RABBIT_PORT=${XMS_CINDER_RABBIT_PORT:-5672}
NOVA_PORT=${XMS_NOVA_API_PORT:-8774}
PLACEMENT_PORT=${XMS_NOVA_PLACEMENT_PORT:-8778}
NEUTRON_PORT=${XMS_NOVA_NEUTRON_PORT:-9696}
CINDER_PROXY_PORT=${XMS_NOVA_CINDER_PROXY_PORT:-8777}   # nova -> cinder-proxy -> Cinder (see shims/.../cinderproxy.py)
HOST_NAME=xms-nova              # nova's [DEFAULT] host = the compute host = the hypervisor (node) name

VENV=$DIR/venv
RUN=$DIR/run
LOG=$DIR/log
ETC=$DIR/etc
TOKEN=admin:$PROJECT
DB_STAMP=$DIR/state/db-synced-$(sha256sum "$HERE/requirements.txt" | cut -c1-16)   # schemas synced for this set
SERVICES=(cinder-proxy:cinder-proxy placement-api:placement-api neutron-api:neutron-api nova-api:nova-api nova-conductor:nova-conductor
          nova-scheduler:nova-scheduler nova-compute:xms_nova_shims.compute)   # name:marker (in its cmdline)

SELF=nova.sh PORT_HINT="XMS_NOVA_*_PORT"
# shellcheck source=../lib/services.sh
source "$HERE/../lib/services.sh"   # say/die, start/stop/alive of process groups, need_port, wait_for

http_up() { curl -s -o /dev/null -w '%{http_code}' "$1" | grep -qE '^(200|300)$'; }

# ---------------------------------------------------------------- install
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
  local py stamp src
  # the stamp covers the pinned set and the shims (reinstalled when either changes)
  stamp="$VENV/.installed-$(cat "$HERE/requirements.txt" "$HERE"/shims/pyproject.toml "$HERE"/shims/xms_nova_shims/*.py | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  py=$(find_py311) || die "Python 3.11 is required"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  say "pip install -r scripts/nova/requirements.txt (+ shims) into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$HERE/requirements.txt" >"$LOG/pip.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$LOG/pip.log" | tail -20 >&2; die "pip install failed"; }
  # build the shims from a copy (setuptools would leave build/ and *.egg-info in the source tree)
  src=$(mktemp -d); cp -r "$HERE/shims/." "$src/"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$src" >>"$LOG/pip.log" 2>&1 \
    || { rm -rf "$src"; grep -v '^WARNING: Location' "$LOG/pip.log" | tail -20 >&2; die "pip install shims failed"; }
  rm -rf "$src"
  "$VENV/bin/python" -W ignore -c 'import nova, neutron, placement, gunicorn, openstack, xms_nova_shims.mech' \
    || die "the venv does not import nova/neutron/placement"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

# ---------------------------------------------------------------- config
db_url() { echo "mysql+pymysql://$1:$1@127.0.0.1:$DB_PORT/$2?charset=utf8mb4"; }

write_configs() {
  mkdir -p "$ETC/nova" "$ETC/neutron" "$ETC/placement" "$DIR/state/lock" "$DIR/state/instances" "$DIR/state/neutron"
  local rabbit="rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/"

  cat >"$ETC/placement/placement.conf" <<EOF
# Written by scripts/nova/nova.sh (rewritten on every \`up\`).
[DEFAULT]
log_dir = $LOG
# (without log_file oslo.log names the file after the outermost frame: "<frozen runpy>.log")
log_file = placement-api.log
debug = false

[api]
# placement's own test auth: X-Auth-Token "admin" or "admin:<project>" = admin
auth_strategy = noauth2

[placement_database]
connection = $(db_url placement placement)
EOF

  # nova-api and neutron: their keystone pipelines with keystonemiddleware's authtoken replaced by our
  # noauth filter (nova 34 has no noauth2 pipeline any more; neutron's "noauth" makes every caller admin
  # of one fake project)
  sed -e 's/ authtoken keystonecontext / xms_noauth keystonecontext /' "$VENV/etc/nova/api-paste.ini" >"$ETC/nova/api-paste.ini"
  printf '\n[filter:xms_noauth]\npaste.filter_factory = xms_nova_shims.noauth:filter_factory\n' >>"$ETC/nova/api-paste.ini"
  sed -e 's/ authtoken keystonecontext / xms_noauth keystonecontext /' \
      -e "s#^disable_by_file_path = .*#disable_by_file_path = $DIR/state/neutron/healthcheck_disable#" \
      "$VENV/etc/neutron/api-paste.ini" >"$ETC/neutron/api-paste.ini"
  printf '\n[filter:xms_noauth]\npaste.filter_factory = xms_nova_shims.noauth:filter_factory\n' >>"$ETC/neutron/api-paste.ini"
  grep -q xms_noauth\ keystonecontext "$ETC/nova/api-paste.ini" || die "nova api-paste.ini: authtoken filter not found"
  grep -q xms_noauth\ keystonecontext "$ETC/neutron/api-paste.ini" || die "neutron api-paste.ini: authtoken filter not found"

  cat >"$ETC/neutron/neutron.conf" <<EOF
# Written by scripts/nova/nova.sh (rewritten on every \`up\`).
[DEFAULT]
host = $HOST_NAME
state_path = $DIR/state/neutron
log_dir = $LOG
log_file = neutron-api.log
debug = false
transport_url = $rabbit
core_plugin = ml2
service_plugins =
auth_strategy = keystone
api_paste_config = $ETC/neutron/api-paste.ini
# no agents and no Keystone: nothing to notify
notify_nova_on_port_status_changes = false
notify_nova_on_port_data_changes = false
dhcp_agent_notification = false

[database]
connection = $(db_url neutron neutron)

[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = xms_fake
extension_drivers = port_security

[ml2_type_vxlan]
vni_ranges = 1:1000

[oslo_concurrency]
lock_path = $DIR/state/lock
EOF

  printf '# Written by scripts/nova/nova.sh: nova-api only (third config file)\n[DEFAULT]\nlog_file = nova-api.log\n' >"$ETC/nova/nova-api.conf"
  cat >"$ETC/nova/nova.conf" <<EOF
# Written by scripts/nova/nova.sh (rewritten on every \`up\`).
[DEFAULT]
host = $HOST_NAME
my_ip = 127.0.0.1
state_path = $DIR/state
instances_path = $DIR/state/instances
log_dir = $LOG
debug = false
transport_url = $rabbit
compute_driver = fake.FakeDriver
# the fake driver plugs nothing and neutron has no agents that would send network-vif-plugged
vif_plugging_is_fatal = false
vif_plugging_timeout = 0
heal_instance_info_cache_interval = -1

[api]
auth_strategy = keystone

[wsgi]
api_paste_config = $ETC/nova/api-paste.ini

[api_database]
connection = $(db_url nova nova_api)

[database]
connection = $(db_url nova nova)

[conductor]
workers = 1

[scheduler]
workers = 1
discover_hosts_in_cells_interval = -1

[glance]
# there is no Glance; nova still formats image URLs for its notifications (empty catalog otherwise:
# "EmptyCatalog: The service catalog is empty." fails every build and delete). Nothing listens here.
endpoint_override = http://127.0.0.1:9292

[placement]
auth_type = admin_token
endpoint = http://127.0.0.1:$PLACEMENT_PORT
token = admin:admin
region_name = RegionOne

[neutron]
# admin client (port binding updates); the user's token "admin:<project>" is used for the rest
auth_type = admin_token
endpoint = http://127.0.0.1:$NEUTRON_PORT
token = $TOKEN
endpoint_override = http://127.0.0.1:$NEUTRON_PORT
region_name = RegionOne

[cinder]
# nova forwards the caller's token ("admin:<project>") to Cinder, whose noauth takes the project from it,
# through cinder-proxy, which marks requests with a service token as "from a service" (X-Service-Roles),
# as keystonemiddleware would: Cinder refuses nova's attachment deletes otherwise (bug #2004555 check)
endpoint_template = http://127.0.0.1:$CINDER_PROXY_PORT/v3/%(project_id)s
os_region_name = RegionOne
auth_type = admin_token
endpoint = http://127.0.0.1:$CINDER_PROXY_PORT/v3/$PROJECT
token = $TOKEN

[service_user]
# nova adds X-Service-Token (this token) to its calls to cinder, neutron, placement; only cinder-proxy
# looks at it
send_service_user_token = true
auth_type = admin_token
endpoint = http://127.0.0.1:$CINDER_PROXY_PORT
token = nova:service

[oslo_concurrency]
lock_path = $DIR/state/lock

[oslo_policy]
enforce_new_defaults = true
enforce_scope = true
EOF
}

# ---------------------------------------------------------------- services
cinder_db() { mariadb --no-defaults --socket="$CINDER_DIR/mysql/mysqld.sock" -uroot "$@"; }

ensure_cinder() {  # cinder.sh up unless all of Cinder's services run and answer
  local st
  st=$("$CINDER_SH" status 2>/dev/null || true)
  if [ -n "$st" ] && ! awk 'NR > 1 && /^[a-z-]+ +- *$/ {bad=1} END {exit !bad}' <<<"$st" \
     && cinder_db -e 'select 1' >/dev/null 2>&1 && http_up "http://127.0.0.1:$CINDER_API_PORT/"; then
    say "cinder is running"
  else
    say "cinder is not (fully) running: scripts/cinder/cinder.sh up"
    "$CINDER_SH" up || die "cinder.sh up failed"
  fi
}

create_dbs() {
  local d u
  for d in nova:nova_api nova:nova nova:nova_cell0 placement:placement neutron:neutron; do
    u=${d%%:*}; d=${d#*:}
    cinder_db -e "CREATE DATABASE IF NOT EXISTS $d;
      CREATE USER IF NOT EXISTS '$u'@'127.0.0.1' IDENTIFIED BY '$u';
      CREATE USER IF NOT EXISTS '$u'@'localhost' IDENTIFIED BY '$u';
      GRANT ALL PRIVILEGES ON $d.* TO '$u'@'127.0.0.1';
      GRANT ALL PRIVILEGES ON $d.* TO '$u'@'localhost';"
  done
}

dbs_synced() {  # the schemas exist (a stamp alone would miss a MariaDB data dir wiped by hand)
  [ -f "$DB_STAMP" ] || return 1
  [ "$(cinder_db -N -e 'select count(*) from nova_api.cell_mappings' 2>/dev/null)" = 2 ] || return 1
  cinder_db -N -e 'select 1 from placement.alembic_version; select 1 from neutron.alembic_version;
                   select 1 from nova.alembic_version; select 1 from nova_cell0.alembic_version' >/dev/null 2>&1
}

sync_dbs() {
  local t n="$VENV/bin/nova-manage --config-file $ETC/nova/nova.conf"
  t=$(now)
  if dbs_synced; then say "db schemas in place (stamp $(basename "$DB_STAMP"))"; return 0; fi
  rm -f "$DIR"/state/db-synced-*
  "$VENV/bin/placement-manage" --config-file "$ETC/placement/placement.conf" db sync >"$LOG/db-sync-placement.log" 2>&1 \
    || { tail -20 "$LOG/db-sync-placement.log" >&2; die "placement-manage db sync failed"; }
  "$VENV/bin/neutron-db-manage" --config-file "$ETC/neutron/neutron.conf" upgrade heads >"$LOG/db-sync-neutron.log" 2>&1 \
    || { tail -20 "$LOG/db-sync-neutron.log" >&2; die "neutron-db-manage upgrade heads failed"; }
  # (chained with &&: errexit does not apply inside a { } that is followed by ||)
  {
    $n api_db sync &&
    $n cell_v2 map_cell0 --database_connection "$(db_url nova nova_cell0)" &&
    { $n cell_v2 list_cells | grep -q ' cell1 ' || $n cell_v2 create_cell --name cell1; } &&
    $n db sync
  } >"$LOG/db-sync-nova.log" 2>&1 || { tail -20 "$LOG/db-sync-nova.log" >&2; die "nova-manage db setup failed"; }
  touch "$DB_STAMP"
  say "db sync (placement, neutron, nova api/cell0/cell1): $(since "$t") s"
}

serve() {  # serve NAME MODULE PORT [ENV=VAL...]: a WSGI module under gunicorn (xms_nova_shims.serve)
  local name=$1 module=$2 port=$3; shift 3
  if ! alive "$name" "$name"; then need_port "$name" "$port"; fi
  start "$name" "$name" env "$@" "$VENV/bin/python" -W ignore -m xms_nova_shims.serve "$name" "$module" "127.0.0.1:$port" 4
}

start_services() {
  serve cinder-proxy xms_nova_shims.cinderproxy "$CINDER_PROXY_PORT" XMS_NOVA_CINDER_TARGET="http://127.0.0.1:$CINDER_API_PORT"
  serve placement-api placement.wsgi.api "$PLACEMENT_PORT" OS_PLACEMENT_CONFIG_DIR="$ETC/placement"
  serve neutron-api neutron.wsgi.api "$NEUTRON_PORT" OS_NEUTRON_CONFIG_DIR="$ETC/neutron" OS_NEUTRON_CONFIG_FILES=neutron.conf
  serve nova-api nova.wsgi.osapi_compute "$NOVA_PORT" OS_NOVA_CONFIG_DIR="$ETC/nova" OS_NOVA_CONFIG_FILES="api-paste.ini;nova.conf;nova-api.conf"
  start nova-conductor nova-conductor "$VENV/bin/nova-conductor" --config-file "$ETC/nova/nova.conf"
  start nova-scheduler nova-scheduler "$VENV/bin/nova-scheduler" --config-file "$ETC/nova/nova.conf"
  WATCH=cinder-proxy:cinder-proxy wait_for 60 "cinder-proxy on $CINDER_PROXY_PORT" http_up "http://127.0.0.1:$CINDER_PROXY_PORT/"
  WATCH=placement-api:placement-api wait_for 120 "placement on $PLACEMENT_PORT" http_up "http://127.0.0.1:$PLACEMENT_PORT/"
  WATCH=neutron-api:neutron-api wait_for 120 "neutron on $NEUTRON_PORT" http_up "http://127.0.0.1:$NEUTRON_PORT/"
  WATCH=nova-api:nova-api wait_for 120 "nova-api on $NOVA_PORT" http_up "http://127.0.0.1:$NOVA_PORT/"
  # compute last: it reports its node to placement at start
  # fake.FakeDriver keeps no node identity of its own: state/compute_id (nova's node-identity file) holds one
  # uuid for good, and the launcher hands it to the driver (shims/xms_nova_shims/compute.py)
  [ -s "$DIR/state/compute_id" ] || "$VENV/bin/python" -c 'import uuid; print(uuid.uuid4())' >"$DIR/state/compute_id"
  start nova-compute xms_nova_shims.compute "$VENV/bin/python" -W ignore -m xms_nova_shims.compute "$HOST_NAME" "$(cat "$DIR/state/compute_id")" \
    --config-file "$ETC/nova/nova.conf" --log-file "$LOG/nova-compute.log"
  # map the compute host into cell1 once its compute node record exists
  local t0; t0=$(date +%s)
  until host_mapped; do
    "$VENV/bin/nova-manage" --config-file "$ETC/nova/nova.conf" cell_v2 discover_hosts >>"$LOG/discover-hosts.log" 2>&1 || true
    host_mapped && break
    alive nova-compute xms_nova_shims.compute || { tail -n 30 "$LOG/nova-compute.log" >&2 || true; die "nova-compute died"; }
    (( $(date +%s) - t0 < 180 )) || die "compute host $HOST_NAME not mapped after 180 s (see $LOG/nova-compute.log)"
    sleep 1
  done
}
host_mapped() {
  cinder_db -N -e "select count(*) from nova_api.host_mappings where host='$HOST_NAME'" 2>/dev/null | grep -q '^1$'
}

write_clouds_yaml() {
  cat >"$DIR/clouds.yaml" <<EOF
# Written by scripts/nova/nova.sh. No Keystone: nova-api and neutron take the identity from
# "X-Auth-Token: user:project" (user "admin" = admin role), Cinder the same way; Cinder answers requests
# WITHOUT that header (keystoneauth's unauthenticated version discovery) with a fake 204. So after
# openstack.connect(cloud="xms-nova") also set, before the first request:
#   conn.session.additional_headers["X-Auth-Token"] = conn.config.config["auth"]["token"]
# (scripts/nova/xms_nova_conn.py does this; see scripts/nova/README.md).
clouds:
  xms-nova:
    auth_type: admin_token
    auth:
      endpoint: http://127.0.0.1:$NOVA_PORT/v2.1
      token: $TOKEN
    compute_endpoint_override: http://127.0.0.1:$NOVA_PORT/v2.1
    network_endpoint_override: http://127.0.0.1:$NEUTRON_PORT
    block_storage_endpoint_override: http://127.0.0.1:$CINDER_API_PORT/v3/$PROJECT
    block_storage_api_version: '3'
    placement_endpoint_override: http://127.0.0.1:$PLACEMENT_PORT
    region_name: RegionOne
    xms_project_id: $PROJECT
    # not for clients: Cinder through cinder-proxy (what nova uses); with an X-Service-Token header a
    # request counts as nova's, e.g. to delete attachments of a server that no longer exists
    xms_cinder_service_endpoint: http://127.0.0.1:$CINDER_PROXY_PORT/v3/$PROJECT
EOF
}

# the clouds.yaml given on the command line, not one a caller exported (openstacksdk reads only the first file)
py() { PYTHONDONTWRITEBYTECODE=1 XMS_NOVA_DIR=$DIR OS_CLIENT_CONFIG_FILE=$DIR/clouds.yaml "$VENV/bin/python" -W ignore "$@"; }

# ---------------------------------------------------------------- commands
cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root"
  local T0 t; T0=$(now)
  mkdir -p "$DIR" "$RUN" "$LOG"
  local p
  for p in cinder-proxy:$CINDER_PROXY_PORT placement-api:$PLACEMENT_PORT neutron-api:$NEUTRON_PORT nova-api:$NOVA_PORT; do
    alive "${p%%:*}" "${p%%:*}" || need_port "${p%%:*}" "${p#*:}"   # refuse before starting anything
  done
  t=$(now); ensure_cinder; say "cinder: $(since "$t") s"
  t=$(now); install_venv; say "venv: $(since "$t") s"
  write_configs
  create_dbs
  sync_dbs
  t=$(now); start_services; say "nova/neutron/placement services: $(since "$t") s"
  write_clouds_yaml
  t=$(now)
  local compute_t0; compute_t0=$(date -d "$(ps -o lstart= -p "$(pid_of nova-compute)")" +%s)   # its start
  py "$HERE/bootstrap.py" --clouds-yaml "$DIR/clouds.yaml" --cloud xms-nova --host "$HOST_NAME" --compute-since "$compute_t0" \
    || die "bootstrap failed"
  say "bootstrap: $(since "$t") s"
  say "up: ready in $(since "$T0") s"
  cmd_smoke
}

cmd_smoke() {
  py "$HERE/smoke.py" --clouds-yaml "$DIR/clouds.yaml" --cloud xms-nova || die "smoke test failed"
}

cmd_down() {
  local s
  # all at once (nova's services take 2-7 s each to end on SIGTERM)
  for s in "${SERVICES[@]}"; do stop "${s%%:*}" "${s#*:}" & done
  wait
  say "down (cinder, MariaDB and RabbitMQ left as they are: scripts/cinder/cinder.sh down)"
}

cmd_status() { status_table "${SERVICES[@]}"; }

cmd_env() {
  mkdir -p "$DIR"; write_clouds_yaml
  cat <<EOF
# eval "\$(scripts/nova/nova.sh env)"
export XMS_NOVA_DIR=$DIR
export XMS_NOVA_COMPUTE_ENDPOINT=http://127.0.0.1:$NOVA_PORT/v2.1
export XMS_NOVA_NETWORK_ENDPOINT=http://127.0.0.1:$NEUTRON_PORT
export XMS_CINDER_ENDPOINT=http://127.0.0.1:$CINDER_API_PORT/v3
export XMS_CINDER_PROJECT=$PROJECT
export XMS_CINDER_TOKEN=$TOKEN
export XMS_NOVA_PYTHON=$VENV/bin/python
export OS_CLIENT_CONFIG_FILE=$DIR/clouds.yaml
export OS_CLOUD=xms-nova
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
