#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, for development and tests.
#
#   cluster/local.sh up [N]    head (0 CPUs) + N worker nodes (default 2), token auth on
#   cluster/local.sh status    this cluster's nodes: our pids, and Ray's own view
#   cluster/local.sh env       export lines for a shell: eval "$(cluster/local.sh env)"
#   cluster/local.sh down      stop exactly this cluster's processes, remove its network
#
# Every node is its own `ray start --block` (own raylet, object store, workers, temp dir) under
# cluster/node_guard.py, which holds the node's whole process tree; its pid is recorded in the
# state dir, so `down` ends those trees and nothing else (never `ray stop`, which ends every Ray
# process on the machine, the test session's included).
#
# Networking (RANRAY_LOCAL_NET):
#   netns     (default as root where `ip netns` works) each worker node runs in its own network
#             namespace on a private bridge, with its own IP: separate hosts as far as Ray can tell
#             (own ports, node IPs, traffic over a real interface). The head stays in the root
#             namespace on the bridge's address, the cluster's private address: its dashboard
#             (job API) listens there, reachable from this machine and from every node (Ray Train
#             calls the state API from worker nodes), and from nowhere else.
#   loopback  every node a separate raylet on 127.0.0.1, with its own ports (non-root fallback).
#
# Settings (environment):
#   RANRAY_LOCAL_DIR           state dir (default /tmp/ranray-local; keep it short: Ray's unix
#                              sockets live under it and socket paths are limited to 107 bytes)
#   RANRAY_LOCAL_NET           auto | netns | loopback                           (default auto)
#   RANRAY_LOCAL_CPUS          CPUs per worker node                              (default 1)
#   RANRAY_LOCAL_OBJECT_STORE_MB  object store per node; the nodes share /dev/shm (default 400)
#   RANRAY_LOCAL_PORT / RANRAY_LOCAL_DASHBOARD_PORT   head ports (default: free ports)
#   RANRAY_LOCAL_SUBNET        netns mode: first three octets, e.g. 10.231.7  (default: from the dir)
#   RANRAY_RAY                 the ray executable (default: the repo's .venv, else `ray` on PATH)
#   RANRAY_LOCAL_TIMEOUT       seconds to wait for the nodes to join           (default 120)
#   RANRAY_LOCAL_START_NICE    niceness of a node while it starts (default -10 as root, else 0)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${RANRAY_LOCAL_DIR:-/tmp/ranray-local}"
NODES="$DIR/nodes"
TIMEOUT="${RANRAY_LOCAL_TIMEOUT:-120}"

if [[ -n "${RANRAY_RAY:-}" ]]; then
    RAY="$RANRAY_RAY"
elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    RAY="$REPO/.venv/bin/ray"
else
    RAY="$(command -v ray || true)"
fi
[[ -n "$RAY" && -x "$RAY" ]] || { echo "local.sh: no ray executable (set RANRAY_RAY)" >&2; exit 2; }
BIN="$(cd "$(dirname "$RAY")" && pwd)"
PY="$BIN/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

die() { echo "local.sh: $*" >&2; exit 1; }
log() { echo "local.sh: $*" >&2; }

# N distinct ports that are free now (all held open at once while they are picked).
free_ports() {
    "$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# Ports of a node's agents, given up front: for a port left at 0 the raylet waits for the agent
# to report the one it chose and aborts after a fixed 15 s, which a Python agent importing on a
# busy machine can miss. The metrics and runtime-env ports given here are not waited for; the
# agent's HTTP port still is (nodes that miss it are started again, see wait_nodes).
agent_port_args() {
    local p; read -r -a p <<< "$(free_ports 4)"
    echo "--dashboard-agent-listen-port ${p[0]} --dashboard-agent-grpc-port ${p[1]}" \
         "--metrics-export-port ${p[2]} --runtime-env-agent-port ${p[3]}"
}

# A pid is one of ours only while it is still a node_guard started for this state dir: a recorded
# pid that was reused by an unrelated process after a crash must never be signalled.
is_our_guard() {
    local pid="$1"
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "node_guard.py --state $DIR --start-nice "
}

node_names() { [[ -d "$NODES" ]] && find "$NODES" -name '*.pid' -printf '%f\n' | sed 's/\.pid$//' | sort; }

live_nodes() {
    local name
    for name in $(node_names); do
        is_our_guard "$(cat "$NODES/$name.pid")" && echo "$name"
    done
    return 0
}

netns_works() {
    [[ "$(id -u)" == 0 ]] && command -v ip >/dev/null || return 1
    local probe="rrprobe$$"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe"
}

# The nodes as the head's state API sees them (the dashboard needs the token). `count` prints how
# many are alive (-1 while the dashboard does not answer); `table` prints one line per node.
ray_nodes() {
    "$PY" - "$1" "$DASHBOARD_URL" "$RAY_AUTH_TOKEN_PATH" <<'EOF'
import json, sys, urllib.request
what, url, token_path = sys.argv[1:4]
req = urllib.request.Request(url + "/api/v0/nodes?limit=1000&detail=1",
                             headers={"Authorization": "Bearer " + open(token_path).read().strip()})
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        nodes = json.load(r)["data"]["result"]["result"]
except Exception as err:
    print(-1 if what == "count" else f"  (dashboard not answering: {err})")
    sys.exit(0)
if what == "count":
    print(sum(1 for n in nodes if n["state"] == "ALIVE"))
    sys.exit(0)
for n in sorted(nodes, key=lambda n: (not n["is_head_node"], n["node_ip"])):
    res = {k: v for k, v in (n.get("resources_total") or {}).items()
           if k in ("CPU", "GPU") or k.startswith("node_")}
    print(f"  {n['node_id'][:12]}  {n['node_ip']:<15} {'head' if n['is_head_node'] else 'worker':<6} "
          f"{n['state']:<5} {' '.join(f'{k}={v:g}' for k, v in sorted(res.items()))}")
EOF
}

count_alive() { ray_nodes count; }

start_node() {  # name ip netns interface args...
    local name="$1" ip="$2" ns="$3" ifname="$4"; shift 4
    local -a prefix=()
    [[ -n "$ns" ]] && prefix=(ip netns exec "$ns")
    # setsid: the node must not get the terminal's SIGINT or die with this shell. A RAY_AUTH_TOKEN
    # from the caller's shell would override this cluster's token file. RAY_ADDRESS: Ray processes
    # that look for "the" local cluster (Ray Train's placement-group cleaner calls the state API
    # without an address) would otherwise find every Ray instance on this machine and give up.
    # GLOO_SOCKET_IFNAME: torch's gloo backend (DDP on CPU) advertises the address of the host
    # name by default, which every namespace here resolves to loopback; as on any multi-NIC host,
    # the node's interface is named instead. Ray's workers inherit the raylet's environment.
    env -u RAY_AUTH_TOKEN RAY_ADDRESS="$HEAD_IP:$GCS_PORT" PATH="$BIN:$PATH" RAY_AUTH_MODE=token \
        RAY_AUTH_TOKEN_PATH="$RAY_AUTH_TOKEN_PATH" GLOO_SOCKET_IFNAME="$ifname" \
        setsid "${prefix[@]}" "$PY" "$REPO/cluster/node_guard.py" --state "$DIR" --start-nice "$START_NICE" -- \
        "$RAY" start --block --node-ip-address "$ip" --temp-dir "$DIR/ray/$name" \
        --object-store-memory "$((OBJECT_STORE_MB * 1024 * 1024))" --disable-usage-stats "$@" \
        < /dev/null > "$NODES/$name.log" 2>&1 &
    echo $! > "$NODES/$name.pid"
    echo "$ip" > "$NODES/$name.ip"
}

write_env() {
    cat > "$DIR/cluster.env" <<EOF
RAY_ADDRESS=$DASHBOARD_URL
RAY_AUTH_MODE=token
RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH
RANRAY_GCS_ADDRESS=$HEAD_IP:$GCS_PORT
RANRAY_LOCAL_NET=$NET
RANRAY_LOCAL_WORKERS=$N
EOF
}

load_env() {
    [[ -f "$DIR/cluster.env" ]] || die "no cluster state in $DIR (run: cluster/local.sh up)"
    set -a; source "$DIR/cluster.env"; set +a
    DASHBOARD_URL="$RAY_ADDRESS"
}

# Remove this cluster's bridge, namespaces and veths (recorded in $DIR/net before they were made).
cleanup_net() {
    [[ -f "$DIR/net" ]] || return 0
    local BRIDGE NETNS_PREFIX VETH_PREFIX ns link
    source "$DIR/net"
    for ns in $(ip netns list | awk '{print $1}' | grep "^$NETNS_PREFIX" || true); do
        ip netns del "$ns"
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep "^$VETH_PREFIX" || true); do
        ip link del "$link" 2>/dev/null || true  # already gone with its namespace
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -f "$DIR/net"
}

# Ray gives a node 30 s to register with the GCS, and a raylet 15 s to hear from its dashboard
# agent (a Python process importing dozens of modules), then gives up; on a machine busy with
# other work a node can miss that. So a node starts at a raised priority, which it drops to the
# normal one as soon as it has joined, and a node that still exits during start-up is started
# again, up to START_TRIES times. Only root may raise a priority.
START_TRIES="${RANRAY_LOCAL_START_TRIES:-3}"
if [[ -n "${RANRAY_LOCAL_START_NICE:-}" ]]; then
    START_NICE="$RANRAY_LOCAL_START_NICE"
elif [[ "$(id -u)" == 0 ]]; then
    START_NICE=-10
else
    START_NICE=0
fi

start_head() {
    # shellcheck disable=SC2046  # agent_port_args prints separate words on purpose
    start_node head "$HEAD_IP" "" "$HEAD_IF" --head --num-cpus=0 "${HEAD_PORTS[@]}" $(agent_port_args)
}

start_worker() {  # i
    local i="$1" name="w$1"
    if [[ "$NET" == netns ]]; then
        # shellcheck disable=SC2046
        start_node "$name" "$SUBNET.$((10 + i))" "$NETNS_PREFIX$i" "${VETH_PREFIX%h}n$i" \
            --address "$HEAD_IP:$GCS_PORT" --num-cpus="$CPUS" --resources="{\"node_$name\": 1}" \
            $(agent_port_args)
    else
        # Nodes that share one network stack need their own worker port ranges too (the
        # default 10002-19999 would be shared with every other raylet here).
        local base=$((21000 + i * 400))
        # shellcheck disable=SC2046
        start_node "$name" 127.0.0.1 "" lo --address "$HEAD_IP:$GCS_PORT" --num-cpus="$CPUS" \
            --resources="{\"node_$name\": 1}" $(agent_port_args) \
            --min-worker-port "$base" --max-worker-port "$((base + 399))"
    fi
}

wait_nodes() {  # count: until that many nodes are alive; restart nodes that exit on the way
    local want="$1" t0=$SECONDS name tries
    until [[ "$(count_alive)" -ge "$want" ]]; do
        sleep 1
        for name in $(node_names); do
            is_our_guard "$(cat "$NODES/$name.pid")" && continue
            tries="$(cat "$NODES/$name.tries" 2>/dev/null || echo 1)"
            tail -5 "$NODES/$name.log" >&2
            (( tries < START_TRIES )) || die "node $name exited during start-up $tries times (log: $NODES/$name.log)"
            log "node $name exited during start-up; starting it again"
            mv "$NODES/$name.log" "$NODES/$name.log.$tries"
            echo $((tries + 1)) > "$NODES/$name.tries"
            if [[ "$name" == head ]]; then start_head; else start_worker "${name#w}"; fi
        done
        (( SECONDS - t0 < TIMEOUT )) || die "only $(count_alive) of $want nodes alive after ${TIMEOUT}s"
    done
    # Joined: back to the normal priority (the workers they start from now on inherit it).
    if [[ "$START_NICE" != 0 ]]; then
        for name in $(node_names); do
            "$PY" "$REPO/cluster/node_guard.py" --renice-tree "$(cat "$NODES/$name.pid")"
        done
    fi
}

cmd_up() {
    N="${1:-2}"
    [[ "$N" =~ ^[0-9]+$ ]] || die "N must be a number of worker nodes, got '$N'"
    [[ -z "$(live_nodes)" ]] || die "a cluster is already running from $DIR (cluster/local.sh down first)"
    # Ray's longest socket path is <temp-dir>/session_<41 chars>/sockets/plasma_store.
    (( ${#DIR} + 12 + 41 + 22 <= 107 )) || die "RANRAY_LOCAL_DIR '$DIR' is too long for Ray's unix sockets; use a short path under /tmp"

    NET="${RANRAY_LOCAL_NET:-auto}"
    if [[ "$NET" == auto ]]; then
        if netns_works; then NET=netns; else NET=loopback; fi
    fi
    [[ "$NET" == netns || "$NET" == loopback ]] || die "RANRAY_LOCAL_NET must be auto, netns or loopback"
    [[ "$NET" == loopback ]] || netns_works || die "netns mode needs root and a working 'ip netns'"

    cleanup_net  # left by a cluster whose `down` never ran
    rm -rf "$NODES" "$DIR/ray" "$DIR/cluster.env"
    # A start-up that fails half way stops whatever it started.
    trap 'log "start-up failed: stopping the nodes that started"; cmd_down' EXIT
    mkdir -p "$NODES" "$DIR/ray" "$DIR/auth"
    OBJECT_STORE_MB="${RANRAY_LOCAL_OBJECT_STORE_MB:-400}"
    CPUS="${RANRAY_LOCAL_CPUS:-1}"

    # One token per cluster, made by Ray's own CLI: HOME points it at the state dir, so the token
    # lands in $DIR/auth/.ray/auth_token and never replaces the user's ~/.ray/auth_token.
    RAY_AUTH_TOKEN_PATH="$DIR/auth/.ray/auth_token"
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        env -u RAY_AUTH_TOKEN -u RAY_AUTH_TOKEN_PATH HOME="$DIR/auth" \
            "$RAY" get-auth-token --generate > /dev/null 2>&1 \
            || die "ray get-auth-token --generate failed"
    fi
    chmod 600 "$RAY_AUTH_TOKEN_PATH"

    local ports; read -r -a ports <<< "$(free_ports 3)"
    GCS_PORT="${RANRAY_LOCAL_PORT:-${ports[0]}}"
    DASH_PORT="${RANRAY_LOCAL_DASHBOARD_PORT:-${ports[1]}}"

    if [[ "$NET" == netns ]]; then
        local id; id="$(printf '%s' "$DIR" | sha1sum | cut -c1-6)"
        local subnet="${RANRAY_LOCAL_SUBNET:-10.$(( 16#${id:0:2} % 200 + 20 )).$(( 16#${id:2:2} ))}"
        if ip -4 addr show | grep -q " $subnet\." || [[ -n "$(ip -4 route show "$subnet.0/24")" ]]; then
            die "subnet $subnet.0/24 is already in use here; set RANRAY_LOCAL_SUBNET"
        fi
        BRIDGE="rrb$id" NETNS_PREFIX="rr$id-w" VETH_PREFIX="rr${id}h" SUBNET="$subnet"
        HEAD_IP="$subnet.1" HEAD_IF="$BRIDGE"
        # Recorded before creating anything, so `down` can remove a half-made network.
        { echo "BRIDGE=$BRIDGE"; echo "NETNS_PREFIX=$NETNS_PREFIX"; echo "VETH_PREFIX=$VETH_PREFIX"; } > "$DIR/net"
        ip link add "$BRIDGE" type bridge
        ip addr add "$HEAD_IP/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    else
        HEAD_IP=127.0.0.1 HEAD_IF=lo
    fi
    DASHBOARD_URL="http://$HEAD_IP:$DASH_PORT"
    write_env

    HEAD_PORTS=(--port "$GCS_PORT" --dashboard-host "$HEAD_IP" --dashboard-port "$DASH_PORT"
                --ray-client-server-port "${ports[2]}")
    start_head
    log "head starting ($NET): gcs $HEAD_IP:$GCS_PORT, dashboard $DASHBOARD_URL"
    wait_nodes 1

    local i
    for i in $(seq 1 "$N"); do
        if [[ "$NET" == netns ]]; then
            local ns="$NETNS_PREFIX$i" ip="$SUBNET.$((10 + i))"
            ip netns add "$ns"
            ip link add "$VETH_PREFIX$i" type veth peer name "${VETH_PREFIX%h}n$i"
            ip link set "${VETH_PREFIX%h}n$i" netns "$ns"
            ip link set "$VETH_PREFIX$i" master "$BRIDGE" up
            ip netns exec "$ns" ip addr add "$ip/24" dev "${VETH_PREFIX%h}n$i"
            ip netns exec "$ns" ip link set "${VETH_PREFIX%h}n$i" up
            ip netns exec "$ns" ip link set lo up
        fi
        # One node at a time: nodes starting together compete for the CPU while Ray's start-up
        # clocks run (a raylet gives its dashboard agent 15 s to report its port).
        start_worker "$i"
        wait_nodes $((i + 1))
    done
    trap - EXIT
    log "up: head + $N worker nodes in $((SECONDS))s; state in $DIR"
    echo "$DASHBOARD_URL"
}

cmd_down() {
    [[ -d "$DIR" ]] || { log "nothing to stop in $DIR"; return 0; }
    local name pid
    local -a pids=()
    # Workers first, then the head, all at once: each guard stops its node and SIGKILLs whatever
    # of its tree is left after its grace period.
    for name in $(node_names | grep -v '^head$'; node_names | grep '^head$'); do
        pid="$(cat "$NODES/$name.pid")"
        if is_our_guard "$pid"; then
            kill -TERM "$pid" && pids+=("$pid")
        fi
    done
    local t0=$SECONDS
    for pid in "${pids[@]}"; do
        while [[ -d "/proc/$pid" ]] && is_our_guard "$pid"; do
            if (( SECONDS - t0 > 60 )); then
                log "node guard $pid did not stop in 60s: SIGKILL to its tree"
                "$PY" "$REPO/cluster/node_guard.py" --kill-tree "$pid"
            fi
            sleep 0.2
        done
    done
    rm -f "$NODES"/*.pid
    cleanup_net
    rm -f "$DIR/cluster.env"
    log "down: stopped ${#pids[@]} node(s) of $DIR"
}

cmd_status() {
    load_env
    printf '%-6s %-8s %-6s %-16s %s\n' NODE PID STATE IP LOG
    local name pid state bad=0
    for name in $(node_names); do
        pid="$(cat "$NODES/$name.pid")"
        if is_our_guard "$pid"; then state=up; else state=gone; bad=1; fi
        printf '%-6s %-8s %-6s %-16s %s\n' "$name" "$pid" "$state" "$(cat "$NODES/$name.ip")" "$NODES/$name.log"
    done
    echo "net: $RANRAY_LOCAL_NET   gcs: $RANRAY_GCS_ADDRESS   dashboard: $RAY_ADDRESS"
    echo "Ray's view:"
    ray_nodes table
    return "$bad"
}

cmd_env() {
    load_env
    sed 's/^/export /' "$DIR/cluster.env"
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
