# Shared by the callN.sh scripts: step NAME LIMIT CMD... logs to runs/logs/$CALL/NAME.log, prints its tail,
# and re-tars logs/ into $OUT after every step (a killed call still returns what finished).
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p runs/logs/$CALL
snap() { tar czf $OUT/$CALL.tgz runs/logs/$CALL runs/*/metrics.jsonl runs/*/*.png 2>/dev/null; true; }
step() {
  local name=$1 lim=$2; shift 2
  if [ "$lim" -lt 10 ]; then echo "== $name skipped: ${lim}s left"; return; fi
  echo "== $name start $(date +%T) t=${SECONDS}s limit ${lim}s: $*"
  timeout --signal=INT --kill-after=20 $lim "$@" > runs/logs/$CALL/$name.log 2>&1
  echo "== $name rc=$? t=${SECONDS}s"
  grep -v "^step .*| loss" runs/logs/$CALL/$name.log | tail -${TAILN:-6}
  snap
}
left() { echo $(( $1 - SECONDS )); }
