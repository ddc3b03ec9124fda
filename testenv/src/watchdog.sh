# mesh-testenv's watchdog, run as `sh -c "$this" mesh-testenv-watchdog MODE ARGS...`.
# Its stdin is a pipe whose only writer is the test process; EOF on it means the test
# process is done with us: it closed the pipe (TestEnv dropped) or it exited (normally,
# by panic, or killed - the kernel closes its descriptors). Either way we clean up, so no
# process outlives the tests.
#
#   run PROGRAM ARGS...  run PROGRAM; on EOF send it SIGTERM, after 5 s SIGKILL.
#                        Exits with PROGRAM's status when PROGRAM exits by itself.
#   janitor DIR          on EOF wait (at most 15 s) until no process has DIR/ in its command
#                        line, then rm -rf DIR.
set -u
mode="$1"
shift
exec 3<&0 </dev/null
case "$mode" in
run)
    "$@" 3<&- &
    child=$!
    (
        while read -r _ <&3; do :; done
        kill -TERM "$child" 2>/dev/null
        i=0
        while kill -0 "$child" 2>/dev/null && [ "$i" -lt 50 ]; do
            sleep 0.1
            i=$((i + 1))
        done
        kill -KILL "$child" 2>/dev/null
    ) &
    watcher=$!
    exec 3<&-
    wait "$child"
    status=$?
    kill "$watcher" 2>/dev/null
    exit "$status"
    ;;
janitor)
    # Waits until no other process mentions DIR/ on its command line (every component gets
    # its paths there), at most 15 s, then removes DIR.
    dir="$1"
    while read -r _ <&3; do :; done
    i=0
    while [ "$i" -lt 75 ]; do
        busy=""
        for f in /proc/[0-9]*/cmdline; do
            cmd="$(tr '\0' ' ' <"$f" 2>/dev/null)" || continue
            case "$cmd" in
            *" mesh-testenv-watchdog janitor $dir "*) ;; # ourselves (and our subshells)
            *"$dir/"*)
                busy=1
                break
                ;;
            esac
        done
        [ -z "$busy" ] && break
        sleep 0.2
        i=$((i + 1))
    done
    rm -rf "$dir"
    ;;
*)
    echo "mesh-testenv-watchdog: unknown mode $mode" >&2
    exit 2
    ;;
esac
