# Shell functions shared by bench/service and bench/service-once (sourced, not run).

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# metric_sum PORT METRIC: the sum of METRIC's samples on keywatch's /metrics (0 while the endpoint
# is not up yet).
metric_sum() {
  { curl -sf "http://127.0.0.1:$1/metrics" || true; } | awk -v m="$2" '$1 ~ "^"m"({|$)" {s+=$2} END {printf "%d\n", s}'
}

# wait_for_events PORT EVENTS PID LOG: polls keywatch (process PID, HTTP on PORT) every 0.1 s until it
# counted EVENTS records. Sets RUN_START and RUN_DONE (epoch seconds of the first count above 0 and
# of the first at EVENTS). Exits with LOG's tail when keywatch ends first or 900 s pass.
wait_for_events() {
  local port=$1 events=$2 pid=$3 log=$4 n now deadline
  RUN_START=""; RUN_DONE=""
  deadline=$(( $(date +%s) + 900 ))
  while :; do
    n=$(metric_sum "$port" keywatch_events_total)
    now=$(date +%s.%N)
    if [[ -z "$RUN_START" && "$n" -gt 0 ]]; then RUN_START=$now; fi
    if [[ "$n" -ge "$events" ]]; then RUN_DONE=$now; return 0; fi
    if [[ $(date +%s) -ge $deadline ]] || ! kill -0 "$pid" 2>/dev/null; then
      echo "keywatch did not finish; its log:" >&2; tail -20 "$log" >&2; exit 1
    fi
    sleep 0.1
  done
}
