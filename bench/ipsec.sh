#!/usr/bin/env bash
# bench/ipsec.sh - IPsec (IKEv2 + ESP in UDP 4500) throughput: sitewire against strongSwan.
#
# Three pairings, measured in interleaved rounds on the same machine:
#   swan-swan   strongSwan charon (kernel-libipsec, userspace ESP) at both ends
#   sw-swan     sitewire at site a, charon at site b
#   sw-sw       sitewire at both ends
# Each run builds a fresh pair of network namespaces swipb-a / swipb-b joined by a veth
# created inside them (underlay 10.202.0.1/24 <-> 10.202.0.2/24; the root namespace is
# never touched), site subnets 10.203.1.0/24 and 10.203.2.0/24 on lo, the tunnel between
# them with AES-256-GCM (IKE aes256gcm16-prfsha256-x25519, ESP aes256gcm16), then:
#   ping   100 pings at 10 ms, avg ms
#   tcp1   iperf3 -t DURATION, 1 stream, a -> b: receiver Gbit/s, and the CPU seconds
#          both tunnel daemons used (utime+stime) per GB received
#
# Usage: bench/ipsec.sh [--rounds N] [--duration S]
#        SITEWIRE_BIN=target/release/sitewire bench/ipsec.sh   (else cargo build --release)
# Requires root, iproute2, iperf3, ping, strongSwan (charon with kernel-libipsec, swanctl).
# Prints a markdown table: median [min-max] per pairing, and ratios against swan-swan.

set -Eeuo pipefail
umask 077
REPO=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
ROUNDS=3
DURATION=10
while (($#)); do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --duration) DURATION=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "ipsec.sh: needs root (network namespaces)" >&2; exit 1; }
CHARON=/usr/lib/ipsec/charon
[[ -x $CHARON ]] || { echo "ipsec.sh: no $CHARON (run scripts/install-test-deps.sh)" >&2; exit 1; }
if [[ -z ${SITEWIRE_BIN:-} ]]; then
  (cd "$REPO" && cargo build --release --quiet)
  SITEWIRE_BIN=$REPO/target/release/sitewire
fi

NS_A=swipb-a; NS_B=swipb-b
UL_A=10.202.0.1; UL_B=10.202.0.2
NET_A=10.203.1.0/24; NET_B=10.203.2.0/24
HOST_A=10.203.1.1; HOST_B=10.203.2.1
WORK=$(mktemp -d /tmp/swipb.XXXX)
RESULTS=$WORK/results.txt
PIDS=()
PSK_B64=$(head -c 32 /dev/urandom | base64)

cleanup_run() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  PIDS=()
  ip netns del $NS_A 2>/dev/null || true
  ip netns del $NS_B 2>/dev/null || true
}
trap 'cleanup_run' EXIT
trap 'exit 130' INT TERM

topology() {
  ip netns add $NS_A; ip netns add $NS_B
  ip -n $NS_A link add swipb-va type veth peer name swipb-vb netns $NS_B
  local ns ul host veth
  for side in a b; do
    if [[ $side == a ]]; then ns=$NS_A; ul=$UL_A; host=$HOST_A; veth=swipb-va
    else ns=$NS_B; ul=$UL_B; host=$HOST_B; veth=swipb-vb; fi
    ip netns exec $ns sysctl -qw net.ipv6.conf.all.disable_ipv6=1
    ip netns exec $ns sysctl -qw net.ipv6.conf.default.disable_ipv6=1
    ip -n $ns link set lo up
    ip -n $ns addr add $host/24 dev lo
    ip -n $ns addr add $ul/24 dev $veth
    ip -n $ns link set $veth up
  done
}

# charon SIDE(a|b) INITIATE(start|none): one charon in the side's namespace.
charon() {
  local side=$1 start=$2 dir=$WORK/charon-$1 ns me peer lnet rnet lid rid
  if [[ $side == a ]]; then ns=$NS_A; me=$UL_A; peer=$UL_B; lnet=$NET_A; rnet=$NET_B; lid=a; rid=b
  else ns=$NS_B; me=$UL_B; peer=$UL_A; lnet=$NET_B; rnet=$NET_A; lid=b; rid=a; fi
  rm -rf "$dir"; mkdir -p "$dir/run"
  cat > "$dir/strongswan.conf" <<EOF
charon {
  load_modular = no
  load = random nonce openssl gcm aes sha1 sha2 hmac kdf kernel-libipsec kernel-netlink socket-default vici
  install_routes = yes
  routing_table = 220
  routing_table_prio = 220
  plugins { vici { socket = unix:///run/charon.vici }
            socket-default { use_ipv6 = no } }
  filelog { main { path = $dir/charon.log
                   default = 1 } }
}
swanctl { load = random nonce openssl }
EOF
  cat > "$dir/swanctl.conf" <<EOF
connections { s2s {
  version = 2
  local_addrs = $me
  remote_addrs = $peer
  proposals = aes256gcm16-prfsha256-x25519
  keyingtries = 0
  local { auth = psk
          id = $lid.bench.test }
  remote { auth = psk
           id = $rid.bench.test }
  children { net { local_ts = $lnet
                   remote_ts = $rnet
                   esp_proposals = aes256gcm16
                   start_action = $start } }
} }
secrets { ike-s2s { id-a = a.bench.test
                    id-b = b.bench.test
                    secret = 0s$PSK_B64 } }
EOF
  ip netns exec $ns unshare --mount --propagation private \
    sh -c "mount --bind $dir/run /run && exec nice -n -20 env STRONGSWAN_CONF=$dir/strongswan.conf $CHARON" \
    >"$dir/stderr" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do [[ -S $dir/run/charon.vici ]] && break; sleep 0.05; done
  ip netns exec $ns env STRONGSWAN_CONF="$dir/strongswan.conf" swanctl --load-all --noprompt \
    --file "$dir/swanctl.conf" --uri "unix://$dir/run/charon.vici" >/dev/null 2>&1
}

# sitewire SIDE(a|b) START(start|none)
sitewire() {
  local side=$1 start=$2 dir=$WORK/sitewire-$1 ns peer lnet rnet lid rid
  if [[ $side == a ]]; then ns=$NS_A; peer=$UL_B; lnet=$NET_A; rnet=$NET_B; lid=a; rid=b
  else ns=$NS_B; peer=$UL_A; lnet=$NET_B; rnet=$NET_A; lid=b; rid=a; fi
  rm -rf "$dir"; mkdir -p "$dir"
  "$SITEWIRE_BIN" keygen > "$dir/site.key"
  echo "$PSK_B64" > "$dir/hq.psk"
  cat > "$dir/site.toml" <<EOF
[site]
name = "$side"
interface = "swipb-t$side"
listen_port = 51820
private_key = "site.key"

[[tunnel]]
name = "hq"
protocol = "ipsec"
endpoint = ["$peer"]
local_subnets = ["$lnet"]
remote_subnets = ["$rnet"]
psk = "hq.psk"
local_id = "$lid.bench.test"
remote_id = "$rid.bench.test"
start_action = "$start"
EOF
  ip netns exec $ns nice -n -20 "$SITEWIRE_BIN" up -c "$dir/site.toml" >"$dir/log" 2>&1 &
  PIDS+=($!)
}

cpu_seconds() {  # utime+stime of the started daemons (all threads), seconds
  local total=0 p t
  for p in "${PIDS[@]}"; do
    [[ -r /proc/$p/stat ]] || continue
    t=$(awk '{print $14 + $15}' "/proc/$p/stat")
    total=$((total + t))
  done
  awk -v t="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

wait_tunnel() {
  for _ in $(seq 150); do
    ip netns exec $NS_A ping -c1 -W1 -I $HOST_A $HOST_B >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "tunnel did not come up; logs in $WORK" >&2
  return 1
}

run_one() {
  local pair=$1 round=$2
  topology
  case $pair in
    swan-swan) charon b none; charon a start ;;
    sw-swan) charon b none; sitewire a start ;;
    sw-sw) sitewire b none; sitewire a start ;;
  esac
  wait_tunnel
  local ping_avg
  ping_avg=$(ip netns exec $NS_A ping -q -c 100 -i 0.01 -I $HOST_A $HOST_B | awk -F/ '/rtt/ {print $5}')
  ip netns exec $NS_B iperf3 -s -1 -B $HOST_B -p 5201 >/dev/null 2>&1 &
  local srv=$!
  sleep 0.5
  local cpu0 cpu1 json bytes secs
  cpu0=$(cpu_seconds)
  json=$(ip netns exec $NS_A iperf3 -c $HOST_B -B $HOST_A -p 5201 -t "$DURATION" -J)
  cpu1=$(cpu_seconds)
  wait $srv 2>/dev/null || true
  bytes=$(jq '.end.sum_received.bytes' <<<"$json")
  secs=$(jq '.end.sum_received.seconds' <<<"$json")
  awk -v p="$pair" -v r="$round" -v b="$bytes" -v s="$secs" -v c0="$cpu0" -v c1="$cpu1" -v pa="$ping_avg" 'BEGIN {
    printf "RESULT pair=%s round=%s metric=tcp1_gbps value=%.3f\n", p, r, b * 8 / s / 1e9
    printf "RESULT pair=%s round=%s metric=cpu_s_per_gb value=%.2f\n", p, r, (c1 - c0) / (b / 1e9)
    printf "RESULT pair=%s round=%s metric=ping_avg_ms value=%.3f\n", p, r, pa
  }' | tee -a "$RESULTS"
  cleanup_run
}

echo "# sitewire IPsec bench $(date -u +%F) on $(nproc) CPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo))"
echo "# strongSwan $(dpkg-query -W -f '${Version}' strongswan-charon 2>/dev/null || echo '?'), sitewire $("$SITEWIRE_BIN" --version 2>/dev/null | head -1), ${DURATION}s TCP, $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
  for pair in swan-swan sw-swan sw-sw; do
    run_one "$pair" "$round"
  done
done

python3 - "$RESULTS" <<'EOF'
import sys, statistics, collections
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = dict(kv.split("=") for kv in line.split()[1:])
    vals[(f["pair"], f["metric"])].append(float(f["value"]))
pairs = ["swan-swan", "sw-swan", "sw-sw"]
print("\n| metric | strongSwan-strongSwan | sitewire-strongSwan | sitewire-sitewire | sw-sw / swan-swan |")
print("|---|---|---|---|---|")
for m in ["tcp1_gbps", "cpu_s_per_gb", "ping_avg_ms"]:
    cells, med = [], {}
    for p in pairs:
        v = vals[(p, m)]
        med[p] = statistics.median(v)
        cells.append(f"{med[p]:.3f} [{min(v):.3f}-{max(v):.3f}]")
    ratio = med["sw-sw"] / med["swan-swan"] if med["swan-swan"] else float("nan")
    print(f"| {m} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
EOF
echo "raw results: $RESULTS"
