#!/usr/bin/env bash
# Write every captured IKE message of shared/interop/vectors as a seed for the ike_decode target.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
out=corpus/ike_decode
mkdir -p "$out"
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
vec = os.path.join("..", "..", "shared", "interop", "vectors")
n = 0
def put(hexstr):
    global n
    with open(os.path.join(out, "seed-%03d" % n), "wb") as f:
        f.write(bytes.fromhex(hexstr))
    n += 1
for path in sorted(glob.glob(os.path.join(vec, "suite-*.json"))):
    for m in json.load(open(path))["messages"]:
        if m["kind"] == "ike":
            put(m["ike"]["message"])
            for p in m["ike"].get("encrypted", {}).get("inner_payloads", []):
                put(p["raw"])
for s in json.load(open(os.path.join(vec, "strongswan-responder-errors.json")))["scenarios"]:
    for k in ("ike_sa_init_request", "ike_sa_init_response", "ike_auth_request",
              "ike_auth_response", "retry_request", "retry_response"):
        if k in s:
            put(s[k])
print("%d seeds in %s" % (n, out))
PY
