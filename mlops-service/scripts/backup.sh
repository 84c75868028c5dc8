#!/usr/bin/env bash
# Logical backups of the compose Postgres: `make backup` / `make restore FILE=...`.
#
#   backup.sh backup             pg_dump -Fc inside the postgres container into
#                                backups/mlops-<UTC time>.dump (compressed)
#   backup.sh restore FILE       pg_restore it into the running compose database;
#                                refuses a database that holds events unless FORCE=1
#
# Run from mlops-service/. Compose picks the project as always (COMPOSE_PROJECT_NAME,
# else `name:` in docker-compose.yml), so the same commands reach a test project.
# Only the compose database is handled: when the service's DATABASE_URL (from
# the environment or .env, resolved by `docker compose config`) names another
# host, e.g. Neon, both refuse; Neon keeps its own history (point-in-time
# restore, branches).
set -euo pipefail

die() { echo "make $1: $2" >&2; exit 1; }

compose_database_only() {
  local url host
  url=$(docker compose config --format json | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["services"]["mlops-service"]["environment"].get("DATABASE_URL") or "")')
  host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname or "")' "$url")
  if [[ "$host" != "postgres" ]]; then
    die "$1" "DATABASE_URL points at ${host:-another database}, not the compose Postgres: use Neon's point-in-time restore and branches for it (docs/operations.md: Backups)"
  fi
}

# psql inside the postgres container, as the user and database the compose file created.
psql_in_container() {
  docker compose exec -T postgres sh -c 'psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atc "$1"' psql "$1"
}

case "${1:-}" in
  backup)
    compose_database_only backup
    mkdir -p backups
    file="backups/mlops-$(date -u +%Y%m%dT%H%M%SZ).dump"
    # Written under a temporary name so a failed dump never looks like a backup.
    docker compose exec -T postgres sh -c 'pg_dump -Fc -U "$POSTGRES_USER" -d "$POSTGRES_DB"' \
      > "$file.partial" || { rm -f "$file.partial"; die backup "pg_dump failed (is the compose postgres running? make up)"; }
    mv "$file.partial" "$file"
    echo "make backup: wrote mlops-service/$file ($(wc -c < "$file") bytes)"
    ;;
  restore)
    file="${2:-}"
    [[ -n "$file" && -f "$file" ]] || die restore "FILE=${file:-<unset>} is not a file: give one from mlops-service/backups/ (make backup writes them)"
    compose_database_only restore
    events=$(psql_in_container "SELECT CASE WHEN to_regclass('mlops_events') IS NULL THEN 0 ELSE (SELECT count(*) FROM mlops_events) END") \
      || die restore "cannot reach the compose postgres (make up first)"
    if [[ "$events" != "0" && "${FORCE:-}" != "1" ]]; then
      die restore "the database already holds $events events: FORCE=1 replaces them with the backup"
    fi
    # --clean drops what the service's migrations created before recreating it
    # from the dump, all in one transaction: on any error nothing changes.
    docker compose exec -T postgres sh -c \
      'pg_restore --clean --if-exists --no-owner --single-transaction -U "$POSTGRES_USER" -d "$POSTGRES_DB"' \
      < "$file" || die restore "pg_restore failed; the database is unchanged"
    echo "make restore: restored $file ($(psql_in_container "SELECT count(*) FROM mlops_events") events)"
    ;;
  *)
    echo "usage: $0 backup | restore FILE" >&2
    exit 2
    ;;
esac
