#!/bin/bash
# Entry point of the pgvault node image: `entrypoint.sh ROLE [ARGS...]`.
#
# Every role of the HA stack runs from this one image. The role's configuration is rendered from
# the container's environment (the STACK_* variables docker-compose.yml sets per service) by
# `pgvault stack render`, from the same templates `pgvault stack up --runtime local` uses
# (compose/config), into STACK_RUN_DIR; then the program replaces this shell (exec), so it gets
# docker's signals directly and its exit ends the container. ARGS are passed on to the program.
set -euo pipefail

ROLES="etcd patroni haproxy pgbouncer scheduler"
role="${1:-}"
if [[ $# -gt 0 ]]; then
    shift
fi

run_dir="${STACK_RUN_DIR:-/run/stack}"

render() {
    # A placeholder without a value stops the container with an error naming the variable.
    pgvault stack render "$1" --out "$run_dir/$1"
}

# docker compose passes a variable that .env leaves empty (AWS_DEFAULT_REGION=) as an empty string,
# and boto3 takes an empty value as given: region "" or profile "" break every S3 request. Unset means
# boto3's own defaults apply.
for name in $(compgen -e); do
    if [[ "$name" == AWS_* && -z "${!name}" ]]; then
        unset "$name"
    fi
done

case "$role" in
    etcd)
        mkdir -p -m 0700 "$run_dir"
        render etcd.env
        # etcd takes its settings from ETCD_* variables: export each KEY=VALUE line of the rendered
        # file as it is (no shell evaluation of the values).
        while IFS='=' read -r key value; do
            [[ -z "$key" || "$key" == \#* ]] && continue
            export "$key=$value"
        done < "$run_dir/etcd.env"
        exec etcd "$@"
        ;;
    patroni)
        mkdir -p -m 0700 "$run_dir"
        render patroni.yml
        exec patroni "$run_dir/patroni.yml" "$@"
        ;;
    haproxy)
        mkdir -p -m 0700 "$run_dir"
        render haproxy.cfg
        # -db: stay in the foreground, log to stderr.
        exec haproxy -db -f "$run_dir/haproxy.cfg" "$@"
        ;;
    pgbouncer)
        mkdir -p -m 0700 "$run_dir"
        render pgbouncer.ini
        render pgbouncer.users  # the password file, written 0600
        exec pgbouncer "$run_dir/pgbouncer.ini" "$@"
        ;;
    scheduler)
        # WAL can be archived only once the repository knows the cluster (`pgvault init`, which is
        # idempotent). Until this node's PostgreSQL answers, init fails with exit code 1: wait and
        # try again (archive_command keeps failing meanwhile, and PostgreSQL keeps the WAL). Exit
        # code 2 is a mistake in the policy: stop, so the container's log shows it.
        until pgvault init; do
            status=$?
            if [[ $status -ne 1 ]]; then
                exit "$status"
            fi
            echo "entrypoint: pgvault init failed; trying again in 5 s" >&2
            sleep 5
        done
        exec pgvault schedule run "$@"
        ;;
    "")
        echo "entrypoint: no role given; usage: entrypoint.sh ROLE [ARGS...], ROLE one of: $ROLES" >&2
        exit 2
        ;;
    *)
        echo "entrypoint: unknown role '$role'; use one of: $ROLES" >&2
        exit 2
        ;;
esac
