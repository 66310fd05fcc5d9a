#!/usr/bin/env bash
# bench/run.sh - benchmark sitewire against wireguard-go and boringtun-cli.
#
# For every round and every implementation in turn (interleaved: sw, wg-go, bt,
# sw, wg-go, bt, ...) a fresh pair of network namespaces swbench-a / swbench-b is
# built, joined by a veth pair created directly inside them (underlay
# 10.200.0.1/24 <-> 10.200.0.2/24; nothing in the root namespace, no default
# route). One tunnel daemon runs in each namespace (overlay 10.201.0.1 <->
# 10.201.0.2, each end with its own /32 and a /32 route to the other, MTU 1420),
# and the tests run from swbench-a to swbench-b over the overlay:
#   ping        100 pings at 10 ms over the idle tunnel: min/avg/max/mdev ms, loss %
#   tcp1        iperf3 -t 10 -C cubic, 1 stream: receiver/sender Gbit/s, retransmits,
#               tunnel CPU-s (both daemons, utime+stime of all threads) and CPU-s per GB
#   tcp4        the same with -P 4
#   udp_search  highest offered UDP rate with <= 0.5 % loss (3 s probes, doubling
#               from 100 Mbit/s, then 5 bisection steps); delivered Gbit/s. Each probe's
#               log line says where datagrams were dropped: the sender's TUN queue, the
#               receiving daemon's socket or the receiving iperf3's socket
#
# Usage:
#   bench/run.sh [--rounds N] [--impls "sitewire wireguard-go boringtun"]
#                [--tests "ping tcp1 tcp4 udp_search"] [--duration S]
#                [--install-boringtun] [--idle-pct P] [--idle-max S]
#   bench/run.sh --cleanup      remove leftovers of a run killed with SIGKILL
#   bench/run.sh --summarize FILE   rebuild the table from a results file
#
# Defaults: --rounds 3, --impls "sitewire wireguard-go boringtun",
#           --tests "ping tcp1 tcp4", --duration 10, --idle-pct 15, --idle-max 60.
#
# Environment:
#   SITEWIRE_BIN     use this sitewire binary instead of running `cargo build --release`
#   WIREGUARD_GO_BIN wireguard-go binary (default: wireguard-go from PATH)
#   BORINGTUN_BIN    boringtun-cli binary (default: PATH, then ~/.cargo/bin)
#   SWBENCH_UDP_BUFFER  iperf3 -w of the UDP probes (default 4M; empty: iperf3's own)
#
# Output: a markdown header (machine, versions, settings) and, at the end, a table
# "median [min–max]" per metric and implementation with ratio columns
# sitewire/<other>. Raw lines `RESULT impl=.. round=.. metric=.. value=..` go to
# /tmp/swbench-<date>.XXXX/results.txt (path printed at the end); per-run logs,
# iperf3 JSON and daemon logs sit next to it.
#
# Requires root, iproute2, iperf3, ping (iputils), jq, wg (wireguard-tools), flock,
# and for the sitewire build cargo. Everything it starts runs at nice -20.

set -Eeuo pipefail
umask 077

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
BENCH_DIR=$(dirname "$SCRIPT_PATH")
REPO_DIR=$(dirname "$BENCH_DIR")

# ---- fixed topology (not configurable: keeps all traffic inside the pair) ----
NS_A=swbench-a;     NS_B=swbench-b
VETH_A=swbench-va;  VETH_B=swbench-vb
TUN_A=swbench-ta;   TUN_B=swbench-tb     # distinct: all UAPI sockets share /var/run/wireguard
UL_A=10.200.0.1;    UL_B=10.200.0.2      # underlay (veth), /24
OL_A=10.201.0.1;    OL_B=10.201.0.2      # overlay (tunnel): own /32 + route to the peer's /32
# (not a shared /24: sitewire rejects remote_subnets that overlap the site's own address)
WG_PORT=51820
IPERF_PORT=5201
MTU=1420
PARALLEL=4                               # streams of tcp4
UAPI_DIR=/var/run/wireguard
SW_CTL_DIR=/run/sitewire                 # sitewire's control sockets
KNOWN_IMPLS="sitewire wireguard-go boringtun"
KNOWN_TESTS="ping tcp1 tcp4 udp_search"

# ---- settings (options override; exported so the per-run child sees the same) ----
export SWBENCH_ROUNDS=${SWBENCH_ROUNDS:-3}
export SWBENCH_IMPLS=${SWBENCH_IMPLS:-$KNOWN_IMPLS}
export SWBENCH_TESTS=${SWBENCH_TESTS:-ping tcp1 tcp4}
export SWBENCH_DURATION=${SWBENCH_DURATION:-10}
export SWBENCH_IDLE_PCT=${SWBENCH_IDLE_PCT:-15}
export SWBENCH_IDLE_MAX=${SWBENCH_IDLE_MAX:-60}
export SWBENCH_PING_COUNT=${SWBENCH_PING_COUNT:-100}
export SWBENCH_PING_INTERVAL=${SWBENCH_PING_INTERVAL:-0.01}
export SWBENCH_UDP_MAX_LOSS=${SWBENCH_UDP_MAX_LOSS:-0.5}
export SWBENCH_UDP_PROBE_S=${SWBENCH_UDP_PROBE_S:-3}
# iperf3 -w for the UDP probes (empty: iperf3's default, the host's 208 KiB): with the
# default the receiving iperf3 itself overflows on bare veth above ~1 Gbit/s here.
export SWBENCH_UDP_BUFFER=${SWBENCH_UDP_BUFFER-4M}
export SWBENCH_CC=${SWBENCH_CC-cubic}
NICE=(nice -n -20)
INSTALL_BORINGTUN=0
BORINGTUN_VERSION=0.7.1
CLK_TCK=$(getconf CLK_TCK)

log() { printf '# %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -E/p' "$SCRIPT_PATH" | sed '$d; s/^# \{0,1\}//'; }

# =============================================================================
# Small helpers shared by the parent and the per-run child
# =============================================================================

proc_fields() { # pid -> /proc/PID/stat fields from field 3 (state) on
  local s
  { s=$(<"/proc/$1/stat"); } 2>/dev/null || return 1
  printf '%s' "${s##*) }"
}
proc_starttime() { local f a; f=$(proc_fields "$1") || return 1; read -ra a <<<"$f"; echo "${a[19]}"; }
alive() { local f; f=$(proc_fields "$1") || return 1; [[ ${f:0:1} != Z && ${f:0:1} != X ]]; }

# utime+stime (fields 14, 15) of whole processes, i.e. all their threads, in clock ticks
cpu_ticks() {
  local total=0 p f a
  for p in "$@"; do
    f=$(proc_fields "$p") || continue
    read -ra a <<<"$f"
    total=$((total + a[11] + a[12]))
  done
  echo "$total"
}

sys_ticks() { # -> "busy total" over all CPUs, from /proc/stat
  local _c u n s i w q sq st _rest
  read -r _c u n s i w q sq st _rest </proc/stat
  echo "$((u + n + s + q + sq + st)) $((u + n + s + i + w + q + sq + st))"
}

div() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "nan"; else printf "%.4f", a / b }'; }

busy_sample() { # seconds -> whole-machine CPU busy % over that window
  local b0 t0 b1 t1
  read -r b0 t0 < <(sys_ticks); sleep "$1"; read -r b1 t1 < <(sys_ticks)
  div "$((100 * (b1 - b0)))" "$((t1 - t0))"
}

ns_exists() { [[ -e /run/netns/$1 ]]; }

# =============================================================================
# Per-run child: `run.sh __run-one IMPL ROUND RUNDIR`
# One implementation, one round, fresh namespaces; everything torn down on exit.
# =============================================================================

PIDS=(); PID_NAMES=(); CREATED_NS=(); FG_PID=""; KEYDIR=""; CLEANED=0
PID_A=""; PID_B=""; TCP_RX_BYTES=0; TX_OVER_RX=""

note() { # something worth reporting (sitewire errors, unclean exits ...)
  log "NOTE: $*"
  printf 'NOTE impl=%s round=%s %s\n' "$IMPL" "$ROUND" "$*" >>"$RUNDIR/notes.txt"
}
info() { printf 'INFO impl=%s round=%s key=%s value=%s\n' "$IMPL" "$ROUND" "$1" "$2" >>"$RUNDIR/info.txt"; }
emit() { # metric value
  log "$IMPL r$ROUND: $1 = $2"
  printf 'RESULT impl=%s round=%s metric=%s value=%s\n' "$IMPL" "$ROUND" "$1" "$2" >>"$RUNDIR/results.txt"
}

record_pid() { # pid label: the only processes cleanup ever signals
  PIDS+=("$1"); PID_NAMES+=("$2")
  printf '%s\t%s\t%s\n' "$1" "$(proc_starttime "$1" || echo '?')" "$2" >>"$RUNDIR/pids"
}

STOP_RC=0; STOP_KILLED=0
stop_pid() { # pid label -> STOP_RC (exit status), STOP_KILLED (needed SIGKILL)
  local pid=$1 i
  STOP_KILLED=0; STOP_RC=0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "$2 (pid $pid) still running 5 s after SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      STOP_KILLED=1
    fi
  fi
  wait "$pid" 2>/dev/null || STOP_RC=$?
}

# A measurement runs as a waited background job so that SIGTERM interrupts it at once.
# The output redirections belong to the job, not to this function call: a trap that
# fires during `wait` must still log to the script's own stderr.
run_waited() { # stdout-file stderr-file("-" = same as stdout) command...
  local out=$1 err=$2
  shift 2
  if [[ $err == - ]]; then
    "$@" >"$out" 2>&1 9<&- &
  else
    "$@" >"$out" 2>"$err" 9<&- &
  fi
  FG_PID=$!
  # recorded for `--cleanup` only (this shell stops FG_PID itself); stale lines are
  # harmless: a PID is only signalled while its start time still matches
  printf '%s\t%s\t%s\n' "$FG_PID" "$(proc_starttime "$FG_PID" || echo '?')" measurement >>"$RUNDIR/pids"
  local rc=0
  wait "$FG_PID" || rc=$?
  FG_PID=""
  return "$rc"
}

scan_daemon_log() { # label file
  [[ -s $2 ]] || return 0
  local n
  n=$(grep -Eci '\b(warn|warning|error|panic(ked)?)\b' "$2" || true)
  if ((n > 0)); then
    note "$1 log has $n warning/error line(s), e.g.: $(grep -Ei '\b(warn|warning|error|panic(ked)?)\b' "$2" | head -n 3 | tr -s '\n\t' '  ' | cut -c1-400) [$2]"
  fi
}

child_cleanup() {
  local rc=$?
  ((CLEANED)) && return 0
  CLEANED=1
  trap '' TERM INT HUP # a second signal must not cut the cleanup short
  set +e
  local i ns label sock any_killed=0
  [[ -n $FG_PID ]] && stop_pid "$FG_PID" "measurement"
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    label=${PID_NAMES[i]}
    stop_pid "${PIDS[i]}" "$label"
    if [[ $label == daemon-* ]]; then
      info "${label}_exit" "rc=$STOP_RC killed=$STOP_KILLED"
      ((STOP_KILLED)) && any_killed=1
      if ((STOP_KILLED)); then
        note "$IMPL $label did not stop within 5 s of SIGTERM (SIGKILLed)"
      elif ((STOP_RC != 0)) && [[ $IMPL == sitewire ]]; then
        note "$IMPL $label exited with status $STOP_RC after SIGTERM"
      fi
    fi
  done
  if [[ $IMPL == sitewire ]]; then
    ((any_killed)) || for sock in "$UAPI_DIR/$TUN_A.sock" "$UAPI_DIR/$TUN_B.sock" "$SW_CTL_DIR/$TUN_A.sock" "$SW_CTL_DIR/$TUN_B.sock"; do
      [[ -e $sock ]] && note "sitewire left $sock behind after SIGTERM"
    done
    scan_daemon_log "sitewire a" "$RUNDIR/daemon-a.log"
    scan_daemon_log "sitewire b" "$RUNDIR/daemon-b.log"
  else
    scan_daemon_log "$IMPL a" "$RUNDIR/daemon-a.log"
    scan_daemon_log "$IMPL b" "$RUNDIR/daemon-b.log"
  fi
  for ((i = ${#CREATED_NS[@]} - 1; i >= 0; i--)); do
    ns=${CREATED_NS[i]}
    [[ -n $(ip netns pids "$ns" 2>/dev/null) ]] && log "warning: processes still in $ns: $(ip netns pids "$ns" | tr '\n' ' ')"
    ip netns del "$ns" 2>/dev/null || log "warning: could not delete namespace $ns"
  done
  rm -f "$UAPI_DIR/$TUN_A.sock" "$UAPI_DIR/$TUN_B.sock" "$SW_CTL_DIR/$TUN_A.sock" "$SW_CTL_DIR/$TUN_B.sock"
  [[ -n $KEYDIR ]] && rm -rf "$KEYDIR"
  rm -f "$RUNDIR/pids"
  ((rc == 0)) || log "$IMPL round $ROUND failed (exit $rc); logs in $RUNDIR"
  exit "$rc"
}

wait_for_idle() { # test-name: wait until the machine is < IDLE_PCT busy (max IDLE_MAX s)
  local start=$SECONDS last_log=-100 b
  while :; do
    b=$(busy_sample 2)
    if [[ $SWBENCH_IDLE_PCT == 0 ]] || awk -v b="$b" -v t="$SWBENCH_IDLE_PCT" 'BEGIN { exit !(b < t) }'; then break; fi
    if ((SECONDS - start >= SWBENCH_IDLE_MAX)); then
      log "warning: machine still ${b}% busy after ${SWBENCH_IDLE_MAX} s; measuring anyway (see ${1}_bg_busy_pct)"
      break
    fi
    if ((SECONDS - last_log >= 10)); then
      log "machine ${b}% busy (others' load); waiting for < ${SWBENCH_IDLE_PCT}% (up to ${SWBENCH_IDLE_MAX} s) ..."
      last_log=$SECONDS
    fi
  done
  emit "${1}_bg_busy_pct" "$b"
  emit "${1}_idle_wait_s" "$((SECONDS - start))"
}

setup_underlay() {
  local ns
  for ns in "$NS_A" "$NS_B"; do
    ip netns add "$ns"
    CREATED_NS+=("$ns")
    ip -n "$ns" link set lo up
    # no router solicitations from fresh TUNs; every TCP test starts without cached metrics
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 \
      net.ipv4.tcp_no_metrics_save=1 >/dev/null
  done
  # the veth is created inside swbench-a with its peer moved straight into swbench-b
  ip -n "$NS_A" link add "$VETH_A" type veth peer name "$VETH_B" netns "$NS_B"
  ip -n "$NS_A" addr add "$UL_A/24" dev "$VETH_A"
  ip -n "$NS_B" addr add "$UL_B/24" dev "$VETH_B"
  ip -n "$NS_A" link set "$VETH_A" up
  ip -n "$NS_B" link set "$VETH_B" up
}

make_keys() {
  KEYDIR=$(mktemp -d /tmp/swbench-keys.XXXXXX)
  echo "$KEYDIR" >"$RUNDIR/keydir"
  wg genkey >"$KEYDIR/a.key"; wg pubkey <"$KEYDIR/a.key" >"$KEYDIR/a.pub"
  wg genkey >"$KEYDIR/b.key"; wg pubkey <"$KEYDIR/b.key" >"$KEYDIR/b.pub"
  chmod 600 "$KEYDIR"/*.key
}

# ---- sitewire: configured by TOML; it creates TUN, address, MTU and routes itself ----
write_sitewire_conf() { # out site peer ifname keyfile peer_pub own_overlay peer_overlay peer_underlay
  cat >"$1" <<EOF
# written by bench/run.sh
[site]
name = "$2"
interface = "$4"
listen_port = $WG_PORT
private_key = "$5"
address = ["$7/32"]
mtu = $MTU

[[tunnel]]
name = "$3"
peer_public_key = "$6"
endpoint = ["$9:$WG_PORT"]
remote_subnets = ["$8/32"]
EOF
}

# ---- wireguard-go / boringtun: configured through UAPI with `wg setconf` ----
write_wg_conf() { # out keyfile peer_pub peer_overlay peer_underlay
  {
    echo "[Interface]"
    echo "PrivateKey = $(<"$2")"
    echo "ListenPort = $WG_PORT"
    echo
    echo "[Peer]"
    echo "PublicKey = $3"
    echo "AllowedIPs = $4/32"
    echo "Endpoint = $5:$WG_PORT"
  } >"$1"
}

spawn_daemon() { # side(a|b) ns ifname conf -> SPAWNED_PID
  local side=$1 ns=$2 ifname=$3 conf=$4 lf="$RUNDIR/daemon-$1.log"
  case $IMPL in
    sitewire)
      NO_COLOR=1 ip netns exec "$ns" "${NICE[@]}" "$SITEWIRE_BIN" up -c "$conf" >"$lf" 2>&1 9<&- &
      ;;
    wireguard-go)
      WG_PROCESS_FOREGROUND=1 ip netns exec "$ns" "${NICE[@]}" "$WIREGUARD_GO_BIN" -f "$ifname" >"$lf" 2>&1 9<&- &
      ;;
    boringtun)
      ip netns exec "$ns" "${NICE[@]}" "$BORINGTUN_BIN" --foreground --disable-drop-privileges \
        --log "$RUNDIR/daemon-$side.boringtun.log" "$ifname" >"$lf" 2>&1 9<&- &
      ;;
  esac
  SPAWNED_PID=$!
  record_pid "$SPAWNED_PID" "daemon-$side"
}

wait_daemon_ready() { # side ns ifname pid
  local i lf="$RUNDIR/daemon-$1.log"
  for ((i = 0; i < 150; i++)); do
    if ! alive "$4"; then
      tail -n 20 "$lf" >&2 || true
      die "$IMPL daemon $1 exited during startup (log: $lf)"
    fi
    if [[ -S $UAPI_DIR/$3.sock ]] && ip -n "$2" link show dev "$3" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  tail -n 20 "$lf" >&2 || true
  die "timeout waiting for $3 and $UAPI_DIR/$3.sock ($IMPL daemon $1)"
}

tunnel_side_up() { # side ns ifname own_key peer_pub own_overlay peer_overlay peer_underlay
  local side=$1 ns=$2 ifname=$3 conf
  if [[ $IMPL == sitewire ]]; then
    conf="$RUNDIR/site-$side.toml"
    write_sitewire_conf "$conf" "$side" "$([[ $side == a ]] && echo b || echo a)" "$ifname" \
      "$4" "$5" "$6" "$7" "$8"
    "$SITEWIRE_BIN" check -c "$conf" >>"$RUNDIR/check-$side.log" 2>&1 ||
      { cat "$RUNDIR/check-$side.log" >&2; die "sitewire check rejected $conf"; }
    spawn_daemon "$side" "$ns" "$ifname" "$conf"
    wait_daemon_ready "$side" "$ns" "$ifname" "$SPAWNED_PID"
    # sitewire binds its UAPI socket after address, MTU and routes are in place
    ip -n "$ns" -4 addr show dev "$ifname" | grep -q "inet $6/" ||
      die "sitewire did not put $6 on $ifname"
    ip -n "$ns" -4 route show "$7/32" dev "$ifname" | grep -q . ||
      die "sitewire did not add a route to $7/32 via $ifname"
  else
    conf="$KEYDIR/$side.conf"
    write_wg_conf "$conf" "$4" "$5" "$7" "$8"
    spawn_daemon "$side" "$ns" "$ifname" "$conf"
    wait_daemon_ready "$side" "$ns" "$ifname" "$SPAWNED_PID"
    ip netns exec "$ns" wg setconf "$ifname" "$conf"
    ip -n "$ns" addr add "$6/32" dev "$ifname"
    ip -n "$ns" link set dev "$ifname" mtu "$MTU" up
    ip -n "$ns" route add "$7/32" dev "$ifname"
  fi
  info "link_$side" "$(ip -n "$ns" -o link show dev "$ifname" | sed -E 's/\\ +/ /g' | cut -c1-200)"
  info "routes_$side" "$(ip -n "$ns" -4 route show dev "$ifname" | tr '\n' ';')"
}

setup_tunnel() {
  [[ -d $UAPI_DIR ]] || { mkdir -p "$UAPI_DIR"; chmod 755 "$UAPI_DIR"; }
  make_keys
  tunnel_side_up a "$NS_A" "$TUN_A" "$KEYDIR/a.key" "$(<"$KEYDIR/b.pub")" "$OL_A" "$OL_B" "$UL_B"
  PID_A=$SPAWNED_PID
  tunnel_side_up b "$NS_B" "$TUN_B" "$KEYDIR/b.key" "$(<"$KEYDIR/a.pub")" "$OL_B" "$OL_A" "$UL_A"
  PID_B=$SPAWNED_PID
  info mtu_a "$(ip -n "$NS_A" -o link show dev "$TUN_A" | sed -nE 's/.* mtu ([0-9]+).*/\1/p')"
  log "$IMPL daemons: $NS_A pid $PID_A, $NS_B pid $PID_B"
}

check_daemons() {
  local p
  for p in "$PID_A" "$PID_B"; do
    alive "$p" || die "$IMPL daemon pid $p died (logs: $RUNDIR/daemon-*.log)"
  done
}

ping_quiet() { # count: unmeasured pings (handshake, neighbour entries, wake-up)
  ip netns exec "$NS_A" ping -n -q -c "$1" -i 0.01 -W 1 -I "$OL_A" "$OL_B" >/dev/null 2>&1 || true
}

warmup() {
  local i
  for ((i = 0; i < 20; i++)); do
    ip netns exec "$NS_A" ping -n -q -c 1 -W 1 -I "$OL_A" "$OL_B" >/dev/null 2>&1 && break
  done
  ((i < 20)) || die "no connectivity $OL_A -> $OL_B over the $IMPL tunnel after 20 tries"
  info handshake_pings "$((i + 1))"
  ping_quiet 20
}

pre_measure() { # test-name
  check_daemons
  wait_for_idle "$1"
  ping_quiet 5
}

measure_ping() {
  pre_measure ping
  local f="$RUNDIR/ping.txt" loss rtt mn av mx md
  run_waited "$f" - ip netns exec "$NS_A" "${NICE[@]}" ping -n -q -c "$SWBENCH_PING_COUNT" \
    -i "$SWBENCH_PING_INTERVAL" -w $((SWBENCH_PING_COUNT / 10 + 30)) -I "$OL_A" "$OL_B" ||
    { cat "$f" >&2; die "ping failed"; }
  loss=$(sed -nE 's/.* ([0-9.]+)% packet loss.*/\1/p' "$f")
  rtt=$(sed -nE 's#^rtt min/avg/max/mdev = ([0-9.]+)/([0-9.]+)/([0-9.]+)/([0-9.]+) ms#\1 \2 \3 \4#p' "$f")
  [[ -n $rtt && -n $loss ]] || die "could not parse ping output ($f)"
  read -r mn av mx md <<<"$rtt"
  emit ping_min_ms "$mn"; emit ping_avg_ms "$av"; emit ping_max_ms "$mx"; emit ping_mdev_ms "$md"
  emit ping_loss_pct "$loss"
}

IPERF_UP=0
start_iperf_server() {
  ((IPERF_UP)) && return 0
  ip netns exec "$NS_B" "${NICE[@]}" iperf3 -s -B "$OL_B" -p "$IPERF_PORT" >"$RUNDIR/iperf3-server.log" 2>&1 9<&- &
  local pid=$! i
  record_pid "$pid" "iperf3-server"
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || die "iperf3 server exited: $(cat "$RUNDIR/iperf3-server.log")"
    if ip netns exec "$NS_B" ss -Hltn "sport = :$IPERF_PORT" 2>/dev/null | grep -q .; then
      IPERF_UP=1
      return 0
    fi
    sleep 0.1
  done
  die "iperf3 server did not start listening"
}

iperf_client() { # json-file timeout-s iperf3-args...
  local json=$1 t=$2; shift 2
  run_waited "$json" "$json.stderr" ip netns exec "$NS_A" "${NICE[@]}" timeout "$t" \
    iperf3 -c "$OL_B" -B "$OL_A" -p "$IPERF_PORT" -J "$@"
}

wg_counter() { # ns ifname column(2=rx, 3=tx) -> bytes summed over peers
  ip netns exec "$1" wg show "$2" transfer 2>/dev/null | awk -v c="$3" '{ s += $c } END { printf "%.0f\n", s }'
}

check_tunnel_counters() { # the TCP bytes really went through the tunnel
  local tx rx
  tx=$(wg_counter "$NS_A" "$TUN_A" 3)
  rx=$(wg_counter "$NS_B" "$TUN_B" 2)
  info wg_tx_bytes_a "$tx"; info wg_rx_bytes_b "$rx"; info tcp_rx_bytes_iperf3 "$TCP_RX_BYTES"
  [[ $tx =~ ^[0-9]+$ ]] || die "could not read the tx counter with 'wg show $TUN_A transfer'"
  if ((tx < TCP_RX_BYTES)); then
    die "sanity check failed: $TUN_A tx counter ($tx B) < bytes iperf3 received over TCP ($TCP_RX_BYTES B)"
  fi
  log "sanity: $TUN_A tx counter $tx B >= $TCP_RX_BYTES B received by iperf3 over TCP"
  TX_OVER_RX=$(div "$tx" "$TCP_RX_BYTES")
}

measure_tcp() { # name streams
  local name=$1 streams=$2 args=(-t "$SWBENCH_DURATION")
  ((streams > 1)) && args+=(-P "$streams")
  [[ -n $SWBENCH_CC ]] && args+=(-C "$SWBENCH_CC")
  start_iperf_server
  pre_measure "$name"
  sleep 1
  local json="$RUNDIR/$name.json" a0 b0 s0 a1 b1 s1 sb0 st0 sb1 st1
  a0=$(cpu_ticks "$PID_A"); b0=$(cpu_ticks "$PID_B"); s0=$(sys_ticks)
  if ! iperf_client "$json" $((SWBENCH_DURATION + 30)) "${args[@]}"; then
    die "iperf3 $name failed: $(jq -r '.error // empty' "$json" 2>/dev/null) $(cat "$json.stderr")"
  fi
  a1=$(cpu_ticks "$PID_A"); b1=$(cpu_ticks "$PID_B"); s1=$(sys_ticks)
  check_daemons
  read -r sb0 st0 <<<"$s0"; read -r sb1 st1 <<<"$s1"
  local snd rcv rtx rbytes cpu
  read -r snd rcv rtx rbytes < <(jq -r '[.end.sum_sent.bits_per_second, .end.sum_received.bits_per_second,
      (.end.sum_sent.retransmits // 0), .end.sum_received.bytes] | @tsv' "$json")
  [[ $rbytes =~ ^[0-9]+$ ]] || die "could not parse $json"
  cpu=$(div "$((a1 - a0 + b1 - b0))" "$CLK_TCK")
  emit "${name}_rx_gbps" "$(div "$rcv" 1e9)"
  emit "${name}_tx_gbps" "$(div "$snd" 1e9)"
  emit "${name}_retrans" "$rtx"
  emit "${name}_cpu_s" "$cpu"
  emit "${name}_cpu_s_a" "$(div "$((a1 - a0))" "$CLK_TCK")"
  emit "${name}_cpu_s_b" "$(div "$((b1 - b0))" "$CLK_TCK")"
  emit "${name}_cpu_s_per_gb" "$(div "$cpu" "$(div "$rbytes" 1e9)")"
  emit "${name}_sys_busy_pct" "$(div "$((100 * (sb1 - sb0)))" "$((st1 - st0))")"
  TCP_RX_BYTES=$((TCP_RX_BYTES + rbytes))
  check_tunnel_counters
}

UDP_LOSS=""; UDP_RX=""
# Where UDP probes lose datagrams: "A B C" = packets the sender's TUN dropped (its queue
# was full: the sending daemon fell behind), datagrams the receiving daemon's UDP socket
# dropped, and all UDP receive-buffer drops in the receiving namespace (the daemon's
# socket and the receiving iperf3's).
udp_drop_counters() {
  local tun sock rcv
  tun=$(ip netns exec "$NS_A" cat "/sys/class/net/$TUN_A/statistics/tx_dropped" 2>/dev/null || echo 0)
  sock=$(ip netns exec "$NS_B" cat /proc/net/udp /proc/net/udp6 2>/dev/null |
    awk -v port="$(printf ':%04X' "$WG_PORT")" 'substr($2, length($2) - 4) == port { s += $NF } END { print s + 0 }')
  rcv=$(ip netns exec "$NS_B" cat /proc/net/snmp /proc/net/snmp6 2>/dev/null | awk '
    $1 == "Udp:" { if (!seen) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") col = i; seen = 1 } else if (col) s += $col }
    $1 == "Udp6RcvbufErrors" { s += $2 }
    END { print s + 0 }')
  echo "$tun $sock $rcv"
}

udp_probe() { # rate-bit/s datagram-len -> UDP_LOSS (%), UDP_RX (bit/s)
  local json="$RUNDIR/udp-search-$1.json" t0 s0 r0 t1 s1 r1
  read -r t0 s0 r0 < <(udp_drop_counters)
  iperf_client "$json" $((SWBENCH_UDP_PROBE_S + 30)) -u -b "$1" -l "$2" -t "$SWBENCH_UDP_PROBE_S" \
    ${SWBENCH_UDP_BUFFER:+-w "$SWBENCH_UDP_BUFFER"} ||
    die "iperf3 UDP probe at $1 bit/s failed: $(jq -r '.error // empty' "$json" 2>/dev/null)"
  read -r UDP_LOSS UDP_RX < <(jq -r '[(.end.sum_received.lost_percent // .end.sum.lost_percent),
      .end.sum_received.bits_per_second] | @tsv' "$json")
  [[ -n $UDP_LOSS && -n $UDP_RX ]] || die "could not parse $json"
  read -r t1 s1 r1 < <(udp_drop_counters)
  log "udp_search: offered $1 bit/s -> delivered $UDP_RX bit/s, loss $UDP_LOSS %" \
    "(dropped: sender TUN queue $((t1 - t0)), receiving daemon's socket $((s1 - s0))," \
    "receiving iperf3's socket $(((r1 - r0) - (s1 - s0))))"
}
lossy() { awk -v l="$1" -v m="$SWBENCH_UDP_MAX_LOSS" 'BEGIN { exit !(l > m) }'; }
measure_udp_search() {
  local len=$((MTU - 28)) good=0 good_rx=0 bad=0 r=100000000 i probes=0
  start_iperf_server
  pre_measure udp_search
  while :; do
    sleep 1; udp_probe "$r" "$len"; probes=$((probes + 1))
    if lossy "$UDP_LOSS"; then bad=$r; break; fi
    good=$r; good_rx=$UDP_RX; r=$((r * 2))
    ((r > 40000000000)) && break
  done
  if ((bad > 0)); then
    for ((i = 0; i < 5; i++)); do
      r=$(((good + bad) / 2))
      sleep 1; udp_probe "$r" "$len"; probes=$((probes + 1))
      if lossy "$UDP_LOSS"; then bad=$r; else good=$r; good_rx=$UDP_RX; fi
    done
  fi
  check_daemons
  emit udp_lossfree_rx_gbps "$(div "$good_rx" 1e9)"
  emit udp_lossfree_offered_gbps "$(div "$good" 1e9)"
}

child_main() { # IMPL ROUND RUNDIR
  IMPL=$1; ROUND=$2; RUNDIR=$3
  mkdir -p "$RUNDIR"
  : >"$RUNDIR/results.txt"
  trap child_cleanup EXIT
  trap 'exit 143' TERM; trap 'exit 130' INT; trap 'exit 129' HUP
  log "=== round $ROUND: $IMPL (logs: $RUNDIR) ==="
  setup_underlay
  setup_tunnel
  warmup
  local t
  for t in $SWBENCH_TESTS; do
    case $t in
      ping) measure_ping ;;
      tcp1) measure_tcp tcp1 1 ;;
      tcp4) measure_tcp tcp4 "$PARALLEL" ;;
      udp_search) measure_udp_search ;;
    esac
  done
  check_daemons
  [[ -n $TX_OVER_RX ]] && emit wg_tx_over_tcp_rx "$TX_OVER_RX"
  log "done: $IMPL round $ROUND"
}

# =============================================================================
# Summary table: median [min–max] per metric and implementation, ratio columns
# sitewire/<other> (ratio of medians). Lines not starting with RESULT are ignored,
# except FAILED lines, which are counted.
# =============================================================================

summarize() { # results-file impls...
  local file=$1; shift
  awk -v impl_list="$*" '
    BEGIN {
      n_cat = split("tcp1_rx_gbps|TCP 1 stream, receiver Gbit/s (higher is better);" \
        "tcp1_tx_gbps|TCP 1 stream, sender Gbit/s;" \
        "tcp1_retrans|TCP 1 stream, retransmits;" \
        "tcp4_rx_gbps|TCP 4 streams, receiver Gbit/s (higher is better);" \
        "tcp4_tx_gbps|TCP 4 streams, sender Gbit/s;" \
        "tcp4_retrans|TCP 4 streams, retransmits;" \
        "ping_min_ms|ping min ms (idle tunnel);" \
        "ping_avg_ms|ping avg ms (lower is better);" \
        "ping_max_ms|ping max ms;" \
        "ping_mdev_ms|ping mdev ms;" \
        "ping_loss_pct|ping loss %;" \
        "tcp1_cpu_s_per_gb|tunnel CPU-s per GB delivered, TCP 1 (lower is better);" \
        "tcp4_cpu_s_per_gb|tunnel CPU-s per GB delivered, TCP 4 (lower is better);" \
        "tcp1_cpu_s|tunnel CPU-s during TCP 1 (both daemons);" \
        "tcp1_cpu_s_a|… end a (sender side);" \
        "tcp1_cpu_s_b|… end b (receiver side);" \
        "tcp4_cpu_s|tunnel CPU-s during TCP 4 (both daemons);" \
        "tcp4_cpu_s_a|… end a (sender side);" \
        "tcp4_cpu_s_b|… end b (receiver side);" \
        "udp_lossfree_rx_gbps|UDP, highest rate with ≤ 0.5 % loss, delivered Gbit/s;" \
        "udp_lossfree_offered_gbps|UDP, that rate offered, Gbit/s;" \
        "tcp1_sys_busy_pct|whole-machine CPU busy during TCP 1, %;" \
        "tcp4_sys_busy_pct|whole-machine CPU busy during TCP 4, %;" \
        "ping_bg_busy_pct|machine busy before ping (others), %;" \
        "tcp1_bg_busy_pct|machine busy before TCP 1 (others), %;" \
        "tcp4_bg_busy_pct|machine busy before TCP 4 (others), %;" \
        "udp_search_bg_busy_pct|machine busy before UDP search (others), %;" \
        "ping_idle_wait_s|idle wait before ping, s;" \
        "tcp1_idle_wait_s|idle wait before TCP 1, s;" \
        "tcp4_idle_wait_s|idle wait before TCP 4, s;" \
        "udp_search_idle_wait_s|idle wait before UDP search, s;" \
        "wg_tx_over_tcp_rx|sanity: sender wg tx bytes / iperf3 TCP bytes received (≥ 1)", cat, ";")
      for (i = 1; i <= n_cat; i++) { p = index(cat[i], "|"); m = substr(cat[i], 1, p - 1)
        label[m] = substr(cat[i], p + 1); order[++nm] = m; known[m] = 1 }
      ni = split(impl_list, imps, " ")
    }
    function fmtv(x,   ax) { if (x != x + 0) return x; if (x == int(x)) return sprintf("%d", x)
      ax = x < 0 ? -x : x
      if (ax >= 1000) return sprintf("%.0f", x); if (ax >= 100) return sprintf("%.1f", x)
      if (ax >= 10) return sprintf("%.2f", x); return sprintf("%.3f", x) }
    /^FAILED / { failed[++nf] = $0; next }
    /^RESULT / {
      impl = ""; m = ""; v = ""; r = ""
      for (i = 2; i <= NF; i++) { p = index($i, "="); k = substr($i, 1, p - 1); val = substr($i, p + 1)
        if (k == "impl") impl = val; else if (k == "metric") m = val; else if (k == "value") v = val
        else if (k == "round") r = val }
      if (!(m in known)) { known[m] = 1; order[++nm] = m; label[m] = m }
      c = ++cnt[impl, m]; vals[impl, m, c] = v + 0; seen[m] = 1
      if (!((impl, r) in runs)) { runs[impl, r] = 1; nrun[impl]++ }
    }
    END {
      sw = 0; for (j = 1; j <= ni; j++) if (imps[j] == "sitewire") sw = 1
      hdr = "| metric |"; sep = "|---|"
      for (j = 1; j <= ni; j++) { hdr = hdr " " imps[j] " (n=" (nrun[imps[j]] + 0) ") |"; sep = sep "---|" }
      if (sw) for (j = 1; j <= ni; j++) if (imps[j] != "sitewire") { hdr = hdr " sitewire/" imps[j] " |"; sep = sep "---|" }
      print hdr; print sep
      for (r = 1; r <= nm; r++) {
        m = order[r]; if (!(m in seen)) continue
        line = "| " label[m] " |"
        for (j = 1; j <= ni; j++) {
          impl = imps[j]; n = cnt[impl, m]; has[impl] = 0
          if (n == 0) { line = line " – |"; continue }
          for (a = 1; a <= n; a++) s[a] = vals[impl, m, a]
          for (a = 2; a <= n; a++) { x = s[a]; b = a - 1; while (b >= 1 && s[b] > x) { s[b + 1] = s[b]; b-- }; s[b + 1] = x }
          med[impl] = (n % 2) ? s[(n + 1) / 2] : (s[n / 2] + s[n / 2 + 1]) / 2; has[impl] = 1
          line = line " " fmtv(med[impl]) " [" fmtv(s[1]) "–" fmtv(s[n]) "] |"
        }
        if (sw) for (j = 1; j <= ni; j++) {
          impl = imps[j]; if (impl == "sitewire") continue
          if (m ~ /_busy_pct$|_idle_wait_s$|^wg_tx_over/) line = line " |"
          else if (has["sitewire"] && has[impl] && med[impl] != 0) line = line " " sprintf("%.2f", med["sitewire"] / med[impl]) " |"
          else line = line " – |"
        }
        print line
      }
      if (nf) { print ""; print "Failed runs (not in the table):"; for (i = 1; i <= nf; i++) print "- " failed[i] }
    }' "$file"
}

# =============================================================================
# Parent: options, preflight, build, header, rounds, summary
# =============================================================================

CHILD_PID=""; OUTDIR=""; PARENT_CLEANED=0

# Fallback after the child is gone: anything it recorded but did not stop (e.g. the
# child was SIGKILLed). PIDs are only signalled if their start time still matches.
reap_pids() { # results dir holding r*/pids and r*/keydir files
  local f pid st name cur kd
  for f in "$1"/*/pids; do
    [[ -f $f ]] || continue
    while IFS=$'\t' read -r pid st name; do
      [[ $pid =~ ^[0-9]+$ ]] || continue
      cur=$(proc_starttime "$pid" 2>/dev/null || true)
      if [[ -n $cur && $cur == "$st" ]] && alive "$pid"; then
        log "stopping leftover $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        sleep 1
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
      fi
    done <"$f"
    rm -f "$f"
  done
  for f in "$1"/*/keydir; do
    [[ -f $f ]] || continue
    kd=$(<"$f")
    [[ $kd == /tmp/swbench-keys.* && -d $kd ]] && rm -rf "$kd"
    rm -f "$f"
  done
  return 0
}

reap_world() { # our namespaces and sockets (only ever created by this script)
  local ns
  for ns in "$NS_A" "$NS_B"; do
    if ns_exists "$ns"; then
      [[ -n $(ip netns pids "$ns" 2>/dev/null) ]] &&
        log "warning: unrecorded processes in $ns (not killed): $(ip netns pids "$ns" | tr '\n' ' ')"
      ip netns del "$ns" 2>/dev/null && log "deleted leftover namespace $ns"
    fi
  done
  rm -f "$UAPI_DIR/$TUN_A.sock" "$UAPI_DIR/$TUN_B.sock" "$SW_CTL_DIR/$TUN_A.sock" "$SW_CTL_DIR/$TUN_B.sock"
  return 0
}

reap_leftovers() { # results dir
  reap_pids "$1"
  reap_world
}

parent_cleanup() {
  local rc=$? i
  ((PARENT_CLEANED)) && return 0
  PARENT_CLEANED=1
  trap '' INT TERM HUP
  set +e
  if [[ -n $CHILD_PID ]] && alive "$CHILD_PID"; then
    log "stopping the run in progress (pid $CHILD_PID)"
    kill -TERM "$CHILD_PID" 2>/dev/null
    for ((i = 0; i < 300; i++)); do alive "$CHILD_PID" || break; sleep 0.1; done
    alive "$CHILD_PID" && kill -KILL "$CHILD_PID" 2>/dev/null
    wait "$CHILD_PID" 2>/dev/null
  fi
  [[ -n $OUTDIR ]] && reap_leftovers "$OUTDIR"
  ((rc == 0)) || log "benchmark aborted (exit $rc)${OUTDIR:+; partial results in $OUTDIR}"
  exit "$rc"
}

in_list() { local x; for x in $2; do [[ $x == "$1" ]] && return 0; done; return 1; }

parse_args() {
  while (($#)); do
    case $1 in
      --rounds) SWBENCH_ROUNDS=${2:?--rounds needs a number}; shift 2 ;;
      --impls) SWBENCH_IMPLS=${2:?--impls needs a list}; shift 2 ;;
      --tests) SWBENCH_TESTS=${2:?--tests needs a list}; shift 2 ;;
      --duration) SWBENCH_DURATION=${2:?--duration needs seconds}; shift 2 ;;
      --idle-pct) SWBENCH_IDLE_PCT=${2:?--idle-pct needs a percentage}; shift 2 ;;
      --idle-max) SWBENCH_IDLE_MAX=${2:?--idle-max needs seconds}; shift 2 ;;
      --install-boringtun) INSTALL_BORINGTUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
  done
  [[ $SWBENCH_ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds must be a positive integer"
  [[ $SWBENCH_DURATION =~ ^[1-9][0-9]*$ ]] || die "--duration must be a positive integer"
  [[ $SWBENCH_IDLE_PCT =~ ^[0-9]+$ && $SWBENCH_IDLE_MAX =~ ^[0-9]+$ ]] || die "--idle-pct/--idle-max must be integers"
  local x
  for x in $SWBENCH_IMPLS; do in_list "$x" "$KNOWN_IMPLS" || die "unknown implementation '$x' (known: $KNOWN_IMPLS)"; done
  for x in $SWBENCH_TESTS; do in_list "$x" "$KNOWN_TESTS" || die "unknown test '$x' (known: $KNOWN_TESTS)"; done
  [[ -n ${SWBENCH_IMPLS// /} ]] || die "--impls is empty"
  [[ -n ${SWBENCH_TESTS// /} ]] || die "--tests is empty"
}

preflight() {
  [[ $(id -u) == 0 ]] || die "must run as root (namespaces, TUN devices)"
  local c
  for c in ip iperf3 ping jq awk timeout wg ss flock nice sysctl; do
    command -v "$c" >/dev/null || die "missing command: $c"
  done
  [[ -e /dev/net/tun ]] || die "/dev/net/tun missing"
  exec 9<"$SCRIPT_PATH"
  flock -n 9 || die "another bench/run.sh is running"
  for c in "$NS_A" "$NS_B"; do
    ns_exists "$c" && die "namespace $c exists (leftover of a killed run? '$SCRIPT_PATH --cleanup')"
  done
  for c in "$UAPI_DIR/$TUN_A.sock" "$UAPI_DIR/$TUN_B.sock"; do
    [[ -e $c ]] && die "$c exists (leftover of a killed run? '$SCRIPT_PATH --cleanup')"
  done
  return 0
}

NOTES=()
resolve_binaries() {
  local impls=""
  local x
  for x in $SWBENCH_IMPLS; do
    case $x in
      sitewire)
        if [[ -n ${SITEWIRE_BIN:-} ]]; then
          [[ -x $SITEWIRE_BIN ]] || die "SITEWIRE_BIN=$SITEWIRE_BIN is not executable"
          SITEWIRE_BUILT="given (SITEWIRE_BIN)"
        else
          command -v cargo >/dev/null || die "cargo not found (or set SITEWIRE_BIN)"
          log "building sitewire: cargo build --release (in $REPO_DIR)"
          (cd "$REPO_DIR" && cargo build --release) >&2 || die "cargo build --release failed"
          SITEWIRE_BIN=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/sitewire
          [[ -x $SITEWIRE_BIN ]] || die "no binary at $SITEWIRE_BIN after the build"
          SITEWIRE_BUILT="cargo build --release"
        fi
        SITEWIRE_BIN=$(readlink -f "$SITEWIRE_BIN")
        impls+=" $x"
        ;;
      wireguard-go)
        WIREGUARD_GO_BIN=${WIREGUARD_GO_BIN:-$(command -v wireguard-go || true)}
        [[ -n $WIREGUARD_GO_BIN && -x $WIREGUARD_GO_BIN ]] ||
          die "wireguard-go not found (apt-get install --no-install-recommends wireguard-go)"
        impls+=" $x"
        ;;
      boringtun)
        BORINGTUN_BIN=${BORINGTUN_BIN:-$(command -v boringtun-cli || true)}
        [[ -z $BORINGTUN_BIN && -x ${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli ]] &&
          BORINGTUN_BIN=${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli
        if [[ -z $BORINGTUN_BIN ]] && ((INSTALL_BORINGTUN)); then
          log "installing boringtun-cli $BORINGTUN_VERSION: cargo install boringtun-cli --version $BORINGTUN_VERSION --locked"
          if cargo install boringtun-cli --version "$BORINGTUN_VERSION" --locked >&2; then
            BORINGTUN_BIN=$(command -v boringtun-cli || echo "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli")
          else
            NOTES+=("boringtun skipped: cargo install boringtun-cli --version $BORINGTUN_VERSION failed")
          fi
        fi
        if [[ -n $BORINGTUN_BIN && -x $BORINGTUN_BIN ]]; then
          impls+=" $x"
        elif ((!INSTALL_BORINGTUN)); then
          NOTES+=("boringtun skipped: boringtun-cli is not installed (pass --install-boringtun to run 'cargo install boringtun-cli --version $BORINGTUN_VERSION --locked')")
        fi
        ;;
    esac
  done
  SWBENCH_IMPLS=${impls# }
  [[ -n $SWBENCH_IMPLS ]] || die "no implementation left to measure"
  export SITEWIRE_BIN=${SITEWIRE_BIN:-} WIREGUARD_GO_BIN=${WIREGUARD_GO_BIN:-} BORINGTUN_BIN=${BORINGTUN_BIN:-}
}

print_header() {
  local cpu mem git_rev git_dirty x
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
  mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
  echo "# sitewire tunnel benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo
  echo "| item | value |"
  echo "|---|---|"
  echo "| machine | $(nproc) CPUs \"${cpu:-unknown}\", $mem, kernel \`$(uname -r)\`, host \`$(hostname)\` |"
  for x in $SWBENCH_IMPLS; do
    case $x in
      sitewire)
        git_rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')
        git_dirty=""
        if git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null | grep -q .; then
          git_dirty=", uncommitted changes"
        fi
        echo "| sitewire | \`$("$SITEWIRE_BIN" --version 2>&1 | head -n1)\`, commit $git_rev$git_dirty; $SITEWIRE_BUILT; \`$SITEWIRE_BIN\`; $(rustc --version 2>/dev/null || echo 'rustc ?') |"
        ;;
      wireguard-go)
        echo "| wireguard-go | \`$("$WIREGUARD_GO_BIN" --version 2>&1 | head -n1)\` (package $(dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || echo '?')) |"
        ;;
      boringtun)
        echo "| boringtun-cli | \`$("$BORINGTUN_BIN" --version 2>&1 | head -n1)\` (\`$BORINGTUN_BIN\`; --foreground --disable-drop-privileges, default threads) |"
        ;;
    esac
  done
  echo "| wg | \`$(wg --version 2>&1 | head -n1 | cut -d' ' -f1-2)\` |"
  echo "| iperf3 | \`$(iperf3 --version 2>&1 | head -n1)\` |"
  echo "| ping | \`$(ping -V 2>&1 | head -n1)\` |"
  echo "| settings | rounds $SWBENCH_ROUNDS (interleaved: $SWBENCH_IMPLS); tests: $SWBENCH_TESTS; iperf3 -t $SWBENCH_DURATION, -C ${SWBENCH_CC:-default}, tcp4 = -P $PARALLEL; ping ${SWBENCH_PING_COUNT} × ${SWBENCH_PING_INTERVAL} s; UDP probes -w ${SWBENCH_UDP_BUFFER:-default}; MTU $MTU; nice -20; idle wait < ${SWBENCH_IDLE_PCT} % busy, max ${SWBENCH_IDLE_MAX} s before each test |"
  echo
}

cmd_cleanup() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  local d
  for d in /tmp/swbench-[0-9]*.*/; do
    [[ -d $d ]] && reap_pids "${d%/}"
  done
  reap_world
}

main() {
  case ${1:-} in
    __run-one) shift; child_main "$@"; exit 0 ;;
    --cleanup) cmd_cleanup; exit 0 ;;
    --summarize) shift; [[ -f ${1:-} ]] || die "usage: $0 --summarize RESULTS-FILE [IMPLS...]"
      local f=$1; shift
      summarize "$f" "${@:-$(awk '/^RESULT / { for (i = 2; i <= NF; i++) if ($i ~ /^impl=/ && !s[$i]++) printf "%s ", substr($i, 6) }' "$f")}"
      exit 0 ;;
  esac
  parse_args "$@"
  preflight
  resolve_binaries

  OUTDIR=$(mktemp -d "/tmp/swbench-$(date +%Y%m%d-%H%M%S).XXXX")
  local results=$OUTDIR/results.txt
  : >"$results"
  trap parent_cleanup EXIT
  trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 129' HUP

  {
    print_header
    local n
    for n in "${NOTES[@]}"; do echo "Note: $n"; echo; done
    echo "Results and logs: $OUTDIR"
  } | tee "$OUTDIR/header.md"

  local r impl rundir rc
  for ((r = 1; r <= SWBENCH_ROUNDS; r++)); do
    for impl in $SWBENCH_IMPLS; do
      rundir=$OUTDIR/r$r-$impl
      "$SCRIPT_PATH" __run-one "$impl" "$r" "$rundir" &
      CHILD_PID=$!
      rc=0
      wait "$CHILD_PID" || rc=$?
      CHILD_PID=""
      reap_leftovers "$OUTDIR"
      if ((rc == 0)); then
        cat "$rundir/results.txt" >>"$results"
      else
        log "round $r $impl FAILED (exit $rc); its RESULT lines are left out (see $rundir)"
        echo "FAILED impl=$impl round=$r rc=$rc logs=$rundir" >>"$results"
      fi
      [[ -f $rundir/notes.txt ]] && cat "$rundir/notes.txt" >>"$OUTDIR/notes.txt"
    done
  done

  {
    echo
    echo "## Results: median [min–max] over rounds; ratio columns = sitewire median / other median"
    echo
    # shellcheck disable=SC2086 # the list is meant to be split into words
    summarize "$results" $SWBENCH_IMPLS
    echo
    echo "CPU per GB: lower is better, so a ratio < 1 favours sitewire there; for Gbit/s, > 1 favours sitewire."
    echo "Targets (issue 8), as ratios against each other implementation: TCP 1 and 4 streams >= 3,"
    echo "UDP loss-free rate >= 3, CPU-s per GB <= 0.33, ping avg <= 1 against boringtun."
    if [[ -s $OUTDIR/notes.txt ]]; then
      echo
      echo "Notes from the runs:"
      sed 's/^/- /' "$OUTDIR/notes.txt"
    fi
  } | tee "$OUTDIR/summary.md"
  echo
  echo "RESULT lines: $results"
  echo "Logs and iperf3 JSON: $OUTDIR"
}

main "$@"
