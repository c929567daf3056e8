#!/bin/sh
# The daily retrain in a container (docker-compose.yml, service `retrain`): sleep until the
# next 00:30 UTC, run the same command as ctrserve-retrain.service and the crontab, repeat.
#
# Why a loop and not cron in the container: cron runs as root (it switches to each job's user),
# starts jobs with an almost empty environment (REDIS_URL and the CTRSERVE_* settings compose
# passes would have to be written into the crontab again), logs to syslog or mail instead of
# `docker logs`, and is one more daemon and package in the image. This loop runs as the image's
# unprivileged user, inherits the environment and prints where docker collects it.
#
# Settings, from the environment as in retrain.env.example: CTRSERVE_EXPERIMENT,
# CTRSERVE_EVENTS_DIR, REDIS_URL, CTRSERVE_REGISTRY; RETRAIN_AT (HH:MM, UTC, default 00:30);
# RETRAIN_ON_START=1 also runs once at start, like the timer's Persistent=true after downtime
# (a day already retrained is not trained again, so an extra run costs nothing).
#
#   retrain-loop.sh --dry-run   print the seconds until the next run and the command, and exit
set -eu

dry_run=${RETRAIN_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then
    dry_run=1
fi
: "${CTRSERVE_EXPERIMENT:?set CTRSERVE_EXPERIMENT (the experiment to retrain)}"
: "${CTRSERVE_EVENTS_DIR:?set CTRSERVE_EVENTS_DIR (where drained events accumulate)}"
at=${RETRAIN_AT:-00:30}
case $at in
    [01][0-9]:[0-5][0-9] | 2[0-3]:[0-5][0-9]) ;;
    *) echo "retrain-loop: RETRAIN_AT must be HH:MM (UTC), got '$at'" >&2; exit 2 ;;
esac
hours=${at%%:*}
minutes=${at#*:}
# seconds after midnight UTC; ${x#0} drops a leading zero (08 would be octal)
target=$(( ${hours#0} * 3600 + ${minutes#0} * 60 ))

# the daily command, word for word as in ctrserve-retrain.service
set -- retrain --experiment "$CTRSERVE_EXPERIMENT" --arm all --events "$CTRSERVE_EVENTS_DIR" \
    --drain --warm-start

# Seconds until the next RETRAIN_AT. POSIX time has no leap seconds, so every UTC day is
# 86400 s long and the time of day is the epoch modulo 86400. RETRAIN_LOOP_NOW (epoch seconds)
# stands in for the clock in tests.
seconds_to_next() {
    now=${RETRAIN_LOOP_NOW:-$(date -u +%s)}
    echo $(( (target - now % 86400 + 86400) % 86400 ))
}

if [ "$dry_run" = 1 ]; then
    echo "$(seconds_to_next)"
    echo "ctrserve $*"
    exit 0
fi

# docker stop sends SIGTERM to this shell (PID 1, which ignores signals it has no trap for):
# stop the running command and leave. A retrain killed midway leaves a `running` record and
# nothing deployed; the next run says so and starts over.
child=
stop() {
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    exit 143
}
trap stop TERM INT

# in the background and waited for, so that a signal interrupts the wait at once
run() {
    "$@" &
    child=$!
    status=0
    wait "$child" || status=$?
    child=
    return "$status"
}

retrain() {
    echo "retrain-loop: $(date -u +%Y-%m-%dT%H:%M:%SZ) ctrserve $*" >&2
    # a failed run (a gate rejection is not a failure) is logged, and the loop goes on
    if run ctrserve "$@"; then
        echo "retrain-loop: done" >&2
    else
        echo "retrain-loop: ctrserve retrain failed (exit $status); next try tomorrow" >&2
    fi
}

if [ "${RETRAIN_ON_START:-0}" = 1 ]; then
    retrain "$@"
fi
while :; do
    wait_s=$(seconds_to_next)
    echo "retrain-loop: next retrain of $CTRSERVE_EXPERIMENT at $at UTC, in ${wait_s} s" >&2
    run sleep "$wait_s"
    retrain "$@"
    # past the minute, so that a fast run does not start again at the same RETRAIN_AT
    run sleep 61
done
