# Shared by the benchmark scripts (sourced): an S3 gateway in front of a running local farm.

# start_gateway SF WORK PORT: delegates a user key and a root key from the farm's root key,
# writes a users file with one user (BENCH / bench-secret-key), starts `shardfarm gateway` on
# 127.0.0.1:PORT (state in WORK/gw, log in WORK/gw.log), waits until it listens. Sets GW to
# its pid.
start_gateway() {
  local sf=$1 work=$2 port=$3 who
  for who in root user; do
    "$sf" identity delegate --days 1 --root "$work/farm/farm-root.key" --out "$work/$who.key" 2>/dev/null
  done
  cat > "$work/users.toml" <<TOML
[[users]]
access_key = "BENCH"
secret_key = "bench-secret-key"
identity_file = "$work/user.key"
TOML
  "$sf" --farm "$work/farm" gateway --listen "127.0.0.1:$port" --data "$work/gw" \
    --users "$work/users.toml" --root-key "$work/root.key" >"$work/gw.log" 2>&1 &
  GW=$!
  for _ in $(seq 1 600); do grep -q "listening" "$work/gw.log" && break; sleep 0.2; done
}
