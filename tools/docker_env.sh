#!/usr/bin/env bash
# Prepare a Docker engine and a PostgreSQL image for propstore's container-backed tests, on a
# machine with or without registry access.
#
#   tools/docker_env.sh [prepare]   install (root, Debian), start dockerd if no engine answers,
#                                   make the image, print the environment for a test run
#   tools/docker_env.sh env         print that environment again (nothing is started)
#   tools/docker_env.sh stop        remove propstore's containers, stop the dockerd we started
#
#   eval "$(tools/docker_env.sh)" && pytest --propstore-cluster=containers
#
# Only the `export ...` lines go to stdout; progress goes to stderr. Idempotent: a running
# daemon and an existing image are reused.
#
# The daemon we start touches nothing outside its own folder: its own data and exec roots,
# socket and pidfile under $PROPSTORE_DOCKER_DIR, no firewall rules (--iptables=false,
# --ip-forward=false), no bridge interface (--bridge=none): propstore's containers use host
# networking, each server on its own 127.0.0.1 port, so nothing travels over a bridge.
#
# The image is a parameter (PROPSTORE_PG_IMAGE). Unset: the official `postgres:16` when the
# engine can pull it, else `local/postgres:15`, built once from Debian's packages with
# debootstrap and `docker import` (no registry needed, ~75 s). ryuk, testcontainers' reaper,
# cannot be pulled without a registry either, so it is disabled and propstore labels and
# removes its containers itself (a crashed run's containers are reaped by the next start, and
# by `stop`).
set -euo pipefail

dir=${PROPSTORE_DOCKER_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/propstore/docker}
socket=$dir/docker.sock
pidfile=$dir/dockerd.pid
official=postgres:16
local_image=local/postgres:15
label=propstore.sandbox
docker_cli=$(command -v docker || true)
[ -x /usr/bin/docker ] && docker_cli=/usr/bin/docker  # Debian's client matches its daemon

say() { echo "docker_env: $*" >&2; }
die() { say "$*"; exit 1; }

# The engine to use: DOCKER_HOST if the caller set one, else our own socket.
engine_host() {
  if [ -n "${DOCKER_HOST:-}" ] && [ "${DOCKER_HOST:-}" != "unix://$socket" ]; then
    echo "$DOCKER_HOST"
  elif [ -S "$socket" ] || [ -f "$pidfile" ]; then
    echo "unix://$socket"
  elif [ -S /var/run/docker.sock ]; then
    echo "unix:///var/run/docker.sock"
  else
    echo "unix://$socket"
  fi
}

dk() { "$docker_cli" -H "$host" "$@"; }
answers() { [ -n "$docker_cli" ] && timeout 10 "$docker_cli" -H "$host" version >/dev/null 2>&1; }

install_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} = 0 ] && return
  [ "$(id -u)" = 0 ] || die "need ${missing[*]}; run as root, or install them yourself"
  command -v apt-get >/dev/null || die "need ${missing[*]}, and this is not a Debian system"
  say "installing ${missing[*]}"
  # Debian starts an installed daemon as a system service; we run our own, so deny that
  # (policy-rc.d exit 101) unless the machine already has a policy, and remove ours after.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  # Another apt-get may hold the lock on a shared machine: wait for it rather than fail.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 \
    --no-install-recommends "${missing[@]}" >"$dir/apt.log" 2>&1 ||
    { apt-get update -q >>"$dir/apt.log" 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 \
        --no-install-recommends "${missing[@]}" >>"$dir/apt.log" 2>&1; } ||
    { [ $own_policy = 0 ] || rm -f "$policy"; die "apt-get install ${missing[*]} failed; see $dir/apt.log"; }
  [ $own_policy = 0 ] || rm -f "$policy"
  docker_cli=/usr/bin/docker
}

start_daemon() {
  [ "$(id -u)" = 0 ] || die "no Docker engine answers at $host, and starting one needs root"
  mkdir -p "$dir/data" "$dir/exec"
  say "starting dockerd (socket $socket, log $dir/dockerd.log)"
  # setsid: the daemon outlives this script and is not hit by the caller's Ctrl-C.
  setsid dockerd --data-root "$dir/data" --exec-root "$dir/exec" -H "unix://$socket" \
    --pidfile "$pidfile" --storage-driver=overlay2 --iptables=false --ip-forward=false \
    --ip=127.0.0.1 --bridge=none >"$dir/dockerd.log" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + 60))
  until answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      die "dockerd exited: $(tail -n 3 "$dir/dockerd.log" | tr '\n' ' ')"
    fi
    [ $SECONDS -lt $deadline ] || { kill "$pid"; die "dockerd did not answer within 60 s"; }
    sleep 0.2
  done
}

build_local_image() {
  local root
  root=$(mktemp -d "$dir/rootfs.XXXXXX")
  # shellcheck disable=SC2064
  trap "rm -rf '$root'" EXIT  # also when a step below fails
  say "building $local_image from Debian packages (debootstrap, ~75 s)"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian \
    >"$dir/debootstrap.log" 2>&1 || die "debootstrap failed; see $dir/debootstrap.log"
  # No daemon may start inside the chroot while the package is configured.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends postgresql-15 >>"$dir/debootstrap.log" 2>&1 ||
    die "apt-get install postgresql-15 in the image failed; see $dir/debootstrap.log"
  # Debian's package creates a cluster under /var/lib/postgresql/15/main: unused here.
  rm -rf "$root/var/lib/postgresql/15" "$root/etc/postgresql/15" "$root/usr/sbin/policy-rc.d" \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root/usr/share/doc" \
    "$root/usr/share/man"
  # Stand-alone use (`docker run --network host local/postgres:15`): one trusting server on
  # 127.0.0.1:${PGPORT:-5432}. propstore's cluster brings its own script instead.
  cat >"$root/usr/local/bin/propstore-postgres" <<'EOF'
#!/bin/bash
set -e
data=${PGDATA:-/var/lib/postgresql/data}
bin=/usr/lib/postgresql/15/bin
if [ ! -s "$data/PG_VERSION" ]; then
  "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
fi
exec "$bin/postgres" -D "$data" -c listen_addresses=127.0.0.1 -c "port=${PGPORT:-5432}" \
  -c unix_socket_directories=/tmp "$@"
EOF
  chmod 755 "$root/usr/local/bin/propstore-postgres"
  tar -C "$root" -c . | dk import \
    -c 'USER postgres' -c 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/bin:/usr/bin:/bin' \
    -c 'CMD ["/usr/local/bin/propstore-postgres"]' - "$local_image" >/dev/null
  rm -rf "$root"
}

choose_image() {
  if [ -n "${PROPSTORE_PG_IMAGE:-}" ]; then
    dk image inspect "$PROPSTORE_PG_IMAGE" >/dev/null 2>&1 || dk pull -q "$PROPSTORE_PG_IMAGE" >&2 ||
      die "image $PROPSTORE_PG_IMAGE is neither present nor pullable"
    image=$PROPSTORE_PG_IMAGE
  elif dk image inspect "$official" >/dev/null 2>&1; then
    image=$official
  elif dk image inspect "$local_image" >/dev/null 2>&1; then
    image=$local_image
  elif timeout 120 "$docker_cli" -H "$host" pull -q "$official" >/dev/null 2>&1; then
    image=$official
  else
    say "$official cannot be pulled here"
    command -v debootstrap >/dev/null || die "need debootstrap to build $local_image"
    build_local_image
    image=$local_image
  fi
}

print_env() {
  # ryuk cannot be pulled without a registry; propstore removes its labelled containers.
  echo "export DOCKER_HOST=$host"
  echo "export TESTCONTAINERS_RYUK_DISABLED=true"
  echo "export TESTCONTAINERS_CONNECTION_MODE=docker_host"
  echo "export TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1"
  echo "export PROPSTORE_PG_IMAGE=$image"
}

remove_containers() {
  local ids
  ids=$(dk ps -aq --filter "label=$label" 2>/dev/null || true)
  if [ -n "$ids" ]; then
    say "removing $(echo "$ids" | wc -l) propstore container(s)"
    # shellcheck disable=SC2086
    dk rm -f -v $ids >/dev/null
  fi
}

stop_daemon() {
  local pid deadline=$((SECONDS + 30))
  pid=$(cat "$pidfile" 2>/dev/null || true)
  # Only the process our pidfile names, and only if it is a dockerd.
  if [ -z "$pid" ]; then
    say "no dockerd of ours is running ($pidfile absent)"
  elif [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
    say "stale pidfile (pid $pid is not dockerd)"
  else
    say "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || { say "dockerd ignored SIGTERM; SIGKILL"; kill -KILL "$pid"; }
      sleep 0.2
    done
  fi
  rm -f "$pidfile"
  unmount_leftovers
}

unmount_leftovers() {
  # dockerd leaves its network namespace mount (exec-root/netns/default) behind on exit, and
  # a killed one its data-root mounts: with ours gone, undo every mount under our folder,
  # deepest first.
  local mounts mount
  mounts=$(awk -v dir="$dir/" 'index($2, dir) == 1 { print $2 }' /proc/self/mounts | sort -r)
  for mount in $mounts; do
    umount "$mount" 2>/dev/null || umount -l "$mount" || say "could not unmount $mount"
  done
}

mkdir -p "$dir"
host=$(engine_host)
case "${1:-prepare}" in
  prepare)
    started=$SECONDS
    install_packages
    if ! answers && [ "$host" != "unix://$socket" ]; then
      say "no engine answers at $host; using our own at unix://$socket"
      host=unix://$socket
    fi
    answers || start_daemon
    choose_image
    say "engine $host, image $image, ready in $((SECONDS - started)) s"
    print_env
    ;;
  env)
    answers || die "no Docker engine answers at $host; run: $0 prepare"
    image=${PROPSTORE_PG_IMAGE:-}
    if [ -z "$image" ]; then
      image=$local_image
      dk image inspect "$official" >/dev/null 2>&1 && image=$official
    fi
    print_env
    ;;
  stop)
    answers && remove_containers
    stop_daemon
    ;;
  *)
    die "usage: $0 [prepare|env|stop]"
    ;;
esac
